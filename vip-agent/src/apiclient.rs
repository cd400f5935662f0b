//! The Kubernetes client of the agent. It talks to the apiserver of its own node
//! (`https://127.0.0.1:6443` by default) and never through a Service, DNS or the CNI, so
//! it works before the CNI is up (kubeadm init, K3s with Cilium replacing kube-proxy).
//! The in-cluster `kubernetes` Service is used only with `--apiserver in-cluster`.

use std::{path::Path, time::Duration};

use kube::config::{KubeConfigOptions, Kubeconfig};

/// Where a pod finds its service account.
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// This node's apiserver.
pub const LOCAL_APISERVER: &str = "https://127.0.0.1:6443";

#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    #[error("--kubeconfig {path}")]
    Kubeconfig {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "--apiserver in-cluster: not in a pod (KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT, and the service \
         account under {SA_DIR}, are needed)"
    )]
    // No #[source]: kube's own chain repeats "environment variable not found" twice.
    InCluster(kube::config::InClusterError),
    #[error("no credentials for the API server: give --kubeconfig, or run in a pod with a service account ({SA_DIR})")]
    NoCredentials,
    #[error("--apiserver {url:?} is not a valid URL")]
    Url { url: String },
    #[error("API server {url}: plain HTTP would send the credentials in clear; use https://")]
    PlainHttp { url: String },
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// How long requests may take: the Lease calls of the election are bounded by the renew
/// deadline; watches stream for minutes and end when the server's `timeoutSeconds`
/// says (with no read timeout of their own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeouts {
    /// Connect, read and write each bounded by this.
    Bounded(Duration),
    /// Connect bounded by this; reads unbounded (watches).
    Watch(Duration),
}

/// Where a client comes from, kept so that it can be built again: the kubeconfig is
/// read anew each time (kubeadm renews `admin.conf`'s client certificate in place).
#[derive(Clone, Debug)]
pub struct ClientSource {
    pub kubeconfig: Option<std::path::PathBuf>,
    pub apiserver: Option<String>,
    pub server_name: String,
    pub timeouts: Timeouts,
}

impl ClientSource {
    /// The client, from the sources as they are now (see [`client`]).
    pub async fn build(&self) -> Result<kube::Client, ApiClientError> {
        client(self.kubeconfig.as_deref(), self.apiserver.as_deref(), &self.server_name, self.timeouts).await
    }
}

/// A client's [`ClientSource`] and its rebuilds after a 401 (credentials the apiserver no
/// longer takes: `kubeadm certs renew` rewrote the kubeconfig, and the old certificate
/// expired), at most one per [`Rebuilds::EVERY`], so a kubeconfig that is still wrong is
/// not read again at every retry. The Lease client and the discovery watch each have one.
pub struct Rebuilds {
    source: ClientSource,
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Rebuilds {
    pub const EVERY: Duration = Duration::from_secs(10);

    pub fn new(source: ClientSource) -> Self {
        Self { source, last: std::sync::Mutex::new(None) }
    }

    /// After a 401 to `user` ("the Lease API", "the EndpointSlice watch"): the client
    /// built again from its source; `None` within [`Rebuilds::EVERY`] of the last
    /// rebuild, or if building failed (logged).
    pub async fn after_unauthorized(&self, user: &str) -> Option<kube::Client> {
        {
            // A poisoned lock still holds a usable time: it is only ever replaced whole.
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < Self::EVERY) {
                return None;
            }
            *last = Some(std::time::Instant::now());
        }
        match self.source.build().await {
            Ok(client) => {
                tracing::info!("{user} refused this node's credentials (401): the kubeconfig was read again");
                Some(client)
            }
            Err(e) => {
                tracing::warn!(
                    error = %crate::election::error_chain(&e),
                    "{user} refused this node's credentials (401), and reading them again failed"
                );
                None
            }
        }
    }
}

/// Builds the client: `--kubeconfig` (its server kept unless `--apiserver` is given),
/// else the pod's service-account token and CA against this node's apiserver, else an
/// error. Refuses plain HTTP: the credentials would travel in clear. `server_name`: the
/// name the apiserver's certificate is verified against when the server is a loopback
/// address (see [`config`]).
pub async fn client(
    kubeconfig: Option<&Path>,
    apiserver: Option<&str>,
    server_name: &str,
    timeouts: Timeouts,
) -> Result<kube::Client, ApiClientError> {
    kube::Client::try_from(config(kubeconfig, apiserver, server_name, timeouts).await?).map_err(ApiClientError::Client)
}

/// The client's configuration, as [`client`] describes it. A server on a loopback
/// address (this node's apiserver, `https://127.0.0.1:6443`, the default) is verified
/// against `server_name` (`--health-server-name`, by default `kubernetes.default.svc`),
/// unless the kubeconfig names one (`tls-server-name`): kubeadm's apiserver
/// certificate lists the node's address, the control-plane endpoint and the
/// `kubernetes` names, never 127.0.0.1 (`GetAPIServerAltNames`), so verifying the
/// address failed every call, and the cluster never left its bootstrap hold (a
/// new-user trial). An IP address sends no SNI, so the apiserver serves that same
/// certificate.
async fn config(
    kubeconfig: Option<&Path>,
    apiserver: Option<&str>,
    server_name: &str,
    timeouts: Timeouts,
) -> Result<kube::Config, ApiClientError> {
    let mut config = if apiserver == Some("in-cluster") {
        kube::Config::incluster().map_err(ApiClientError::InCluster)?
    } else if let Some(path) = kubeconfig {
        let shown = path.display().to_string();
        let kc = Kubeconfig::read_from(path).map_err(|e| match e {
            // kube's message quotes the path and then repeats its cause: the cause alone.
            kube::config::KubeconfigError::ReadConfig(io, _) => {
                ApiClientError::Kubeconfig { path: shown.clone(), source: Box::new(io) }
            }
            other => ApiClientError::Kubeconfig { path: shown.clone(), source: Box::new(other) },
        })?;
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| ApiClientError::Kubeconfig { path: shown, source: Box::new(e) })?
    } else {
        let sa = Path::new(SA_DIR);
        if !sa.join("token").exists() {
            return Err(ApiClientError::NoCredentials);
        }
        let url = LOCAL_APISERVER.parse().map_err(|_| ApiClientError::Url { url: LOCAL_APISERVER.into() })?;
        let mut c = kube::Config::new(url);
        c.root_cert_file = Some(sa.join("ca.crt"));
        c.auth_info.token_file = Some(sa.join("token").display().to_string());
        c
    };
    if let Some(url) = apiserver.filter(|u| *u != "in-cluster") {
        config.cluster_url = url.parse().map_err(|_| ApiClientError::Url { url: url.to_owned() })?;
    }
    if config.cluster_url.scheme_str() != Some("https") {
        return Err(ApiClientError::PlainHttp { url: config.cluster_url.to_string() });
    }
    let loopback = config
        .cluster_url
        .host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .and_then(|h| h.parse::<std::net::IpAddr>().ok())
        .is_some_and(|ip| ip.is_loopback());
    if loopback && config.tls_server_name.is_none() {
        config.tls_server_name = Some(server_name.to_owned());
    }
    if config.accept_invalid_certs {
        // Taken from the kubeconfig as kubectl takes it, but said: these credentials
        // (cluster-admin's, with admin.conf) go to whoever answers at that address.
        tracing::warn!(
            server = %config.cluster_url,
            "the kubeconfig says insecure-skip-tls-verify: the API server's certificate is not verified"
        );
    }
    let (connect, read) = match timeouts {
        Timeouts::Bounded(t) => (t, Some(t)),
        Timeouts::Watch(t) => (t, None),
    };
    config.connect_timeout = Some(connect);
    config.read_timeout = read;
    config.write_timeout = Some(connect);
    config.reset_reader_on_write = true;
    // A retried request could renew a Lease after the fencing deadline assumed it failed.
    config.default_retry = false;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "kubernetes.default.svc";

    /// A kubeconfig whose server is `server` (and `extra` under its cluster), with a token.
    fn kubeconfig(dir: &Path, server: &str, extra: &str) -> std::path::PathBuf {
        let kc = dir.join("kubeconfig");
        std::fs::write(
            &kc,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: '{server}'{extra}}}\n\
                 users:\n- name: u\n  user: {{token: secret}}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\n\
                 current-context: x\n"
            ),
        )
        .unwrap();
        kc
    }

    /// This node's apiserver on loopback is verified against the apiserver's name, which
    /// its certificate lists (kubeadm's never lists 127.0.0.1); any other server by its
    /// own address or name; a name the kubeconfig gives is kept.
    #[tokio::test(flavor = "current_thread")]
    async fn a_loopback_apiserver_is_verified_by_its_name() {
        let dir = std::env::temp_dir().join(format!("vip-apiclient-name-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = Timeouts::Bounded(Duration::from_secs(1));
        let name = |kc: &Path, apiserver: Option<&'static str>| {
            let kc = kc.to_owned();
            async move { config(Some(&kc), apiserver, NAME, t).await.unwrap().tls_server_name }
        };
        let kc = kubeconfig(&dir, "https://10.0.0.100:6443", "");
        assert_eq!(name(&kc, None).await, None, "the kubeconfig's own server");
        assert_eq!(name(&kc, Some("https://127.0.0.1:6443")).await.as_deref(), Some(NAME));
        assert_eq!(name(&kc, Some("https://[::1]:6443")).await.as_deref(), Some(NAME));
        assert_eq!(name(&kc, Some("https://10.0.0.11:6443")).await, None);
        let kc = kubeconfig(&dir, "https://127.0.0.1:6443", ", tls-server-name: 'api.example'");
        assert_eq!(name(&kc, None).await.as_deref(), Some("api.example"), "the kubeconfig's name is kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn credentials_never_go_over_plain_http() {
        let dir = std::env::temp_dir().join(format!("vip-apiclient-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kc = kubeconfig(&dir, "http://10.0.0.1:8080", "");
        let Err(err) = client(Some(&kc), None, NAME, Timeouts::Bounded(Duration::from_secs(1))).await else {
            panic!("a plain-HTTP kubeconfig with a token was accepted");
        };
        assert!(matches!(err, ApiClientError::PlainHttp { .. }), "{err}");
        assert!(err.to_string().contains("http://10.0.0.1:8080"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A missing kubeconfig is named once, with its cause once (kube's own message
    /// quoted the path and repeated the cause).
    #[tokio::test(flavor = "current_thread")]
    async fn a_missing_kubeconfig_is_named_once_with_its_cause() {
        let path = Path::new("/nonexistent/kubeconfig");
        let Err(err) = client(Some(path), None, NAME, Timeouts::Bounded(Duration::from_secs(1))).await else {
            panic!("a missing kubeconfig was accepted");
        };
        let shown = format!("{:#}", anyhow::Error::from(err));
        assert_eq!(shown, "--kubeconfig /nonexistent/kubeconfig: No such file or directory (os error 2)");
    }
}
