//! Just enough of a kubeconfig to verify the apiservers' certificates: the cluster CA of
//! the current context, inline (`certificate-authority-data`) or as a file
//! (`certificate-authority`, relative to the kubeconfig).

use std::path::Path;

use serde::Deserialize;

use crate::health::{CaSource, TlsError};

#[derive(Deserialize)]
struct Kubeconfig {
    #[serde(default)]
    clusters: Vec<NamedCluster>,
    #[serde(default)]
    contexts: Vec<NamedContext>,
    #[serde(rename = "current-context", default)]
    current_context: Option<String>,
}

#[derive(Deserialize)]
struct NamedCluster {
    name: String,
    cluster: Cluster,
}

#[derive(Deserialize)]
struct NamedContext {
    name: String,
    context: Context,
}

#[derive(Deserialize)]
struct Cluster {
    #[serde(rename = "certificate-authority-data")]
    ca_data: Option<String>,
    #[serde(rename = "certificate-authority")]
    ca_file: Option<String>,
}

#[derive(Deserialize)]
struct Context {
    cluster: String,
}

/// The CA of the kubeconfig's current context (or its only cluster).
pub fn cluster_ca(path: &Path) -> Result<CaSource<'static>, TlsError> {
    let shown = path.display().to_string();
    let err = |why: String| TlsError::Kubeconfig { path: shown.clone(), why };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let kc: Kubeconfig = serde_yaml::from_str(&text).map_err(|e| err(e.to_string()))?;
    let cluster_name = match &kc.current_context {
        Some(ctx) => kc
            .contexts
            .iter()
            .find(|c| &c.name == ctx)
            .map(|c| c.context.cluster.clone())
            .ok_or_else(|| err(format!("current-context {ctx:?} is not defined")))?,
        None => match kc.clusters.as_slice() {
            [only] => only.name.clone(),
            _ => return Err(err("no current-context and not exactly one cluster".into())),
        },
    };
    let cluster = kc
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .map(|c| &c.cluster)
        .ok_or_else(|| err(format!("cluster {cluster_name:?} is not defined")))?;
    if let Some(data) = &cluster.ca_data {
        let pem = base64_decode(data).ok_or_else(|| err("certificate-authority-data is not base64".into()))?;
        return Ok(CaSource::PemBytes { origin: format!("{shown} (cluster {cluster_name})"), pem });
    }
    if let Some(file) = &cluster.ca_file {
        let base = path.parent().unwrap_or(Path::new("."));
        let ca = base.join(file);
        let pem = std::fs::read(&ca).map_err(|e| err(format!("certificate-authority {}: {e}", ca.display())))?;
        return Ok(CaSource::PemBytes { origin: ca.display().to_string(), pem });
    }
    Err(err(format!("cluster {cluster_name:?} has no certificate-authority")))
}

/// Standard base64 (RFC 4648), padding optional, whitespace ignored.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_known_vectors() {
        for (enc, dec) in [("", ""), ("Zg==", "f"), ("Zm8=", "fo"), ("Zm9v", "foo"), ("Zm9vYmFy", "foobar")] {
            assert_eq!(base64_decode(enc).unwrap(), dec.as_bytes());
        }
        assert!(base64_decode("Zm9v!").is_none());
    }

    #[test]
    fn finds_the_current_contexts_ca() {
        let dir = std::env::temp_dir().join(format!("vip-kc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), b"PEM").unwrap();
        let kc = dir.join("kubeconfig");
        std::fs::write(
            &kc,
            "apiVersion: v1\nkind: Config\ncurrent-context: b\nclusters:\n- name: one\n  cluster:\n    server: https://x\n    certificate-authority-data: Zm9v\n- name: two\n  cluster:\n    server: https://y\n    certificate-authority: ca.pem\ncontexts:\n- name: a\n  context: {cluster: one, user: u}\n- name: b\n  context: {cluster: two, user: u}\n",
        )
        .unwrap();
        match cluster_ca(&kc).unwrap() {
            CaSource::PemBytes { pem, .. } => assert_eq!(pem, b"PEM"),
            _ => panic!("expected PEM bytes"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
