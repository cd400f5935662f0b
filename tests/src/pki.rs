//! A throw-away PKI for the lab: one CA, and a server certificate per apiserver
//! stand-in whose SANs name its node's address, the VIP and the
//! `kubernetes.default.svc` names, as kubeadm's do (`GetAPIServerAltNames`: never
//! 127.0.0.1, so a client of the local apiserver must verify it by name).

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};

pub struct Pki {
    pub dir: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    /// Creates the CA and writes `ca.pem` into `dir`.
    pub fn new(dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "vip-lab-ca");
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("ca.pem"), issuer.pem()).map_err(|e| e.to_string())?;
        Ok(Self { dir: dir.to_owned(), issuer })
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The DNS names every kube-apiserver serving certificate lists.
    pub const APISERVER_NAMES: [&'static str; 4] =
        ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"];

    /// Issues a server certificate for `ips` and the apiserver names; writes
    /// `<name>.pem` and `<name>-key.pem` and returns their paths.
    pub fn server(&self, name: &str, ips: &[IpAddr]) -> Result<(PathBuf, PathBuf), String> {
        self.server_for(name, ips, &Self::APISERVER_NAMES)
    }

    /// Issues a server certificate for exactly `ips` and `dns`.
    pub fn server_for(&self, name: &str, ips: &[IpAddr], dns: &[&str]) -> Result<(PathBuf, PathBuf), String> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        params.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
        for d in dns {
            params.subject_alt_names.push(SanType::DnsName((*d).try_into().map_err(|e: rcgen::Error| e.to_string())?));
        }
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| e.to_string())?;
        let (c, k) = (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}-key.pem")));
        std::fs::write(&c, cert.pem()).map_err(|e| e.to_string())?;
        std::fs::write(&k, key.serialize_pem()).map_err(|e| e.to_string())?;
        Ok((c, k))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
