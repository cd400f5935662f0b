//! The agent's identity and rights: a ServiceAccount, a Role on its one Lease, and a Role
//! to discover the apiservers. Nothing else: the agent never reads Secrets (the kubelet
//! resolves `secretKeyRef`), Nodes, Services or Events.
//!
//! Namespaced Roles, no ClusterRole. The agent reads EndpointSlices only in `default`
//! (`Api::namespaced(client, "default")` in vip-agent's discovery), so a Role there is
//! enough; a ClusterRole would also let it list every Service's pod addresses in every
//! namespace. A RoleBinding in `default` may name a ServiceAccount of another namespace.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::ServiceAccount,
        rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{error::RenderError, settings::Settings, yaml::Documents};

/// Name of the ServiceAccount, the Roles' prefix and the workload.
pub const NAME: &str = "vip-agent";
/// Where the apiservers register (`default/kubernetes`); the agent watches only there.
const DISCOVERY_NAMESPACE: &str = "default";
/// `app.kubernetes.io/name` on every object, so `kubectl get -l` finds them all.
const NAME_LABEL: &str = "app.kubernetes.io/name";

/// Labels of every object rendered here.
pub fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([(NAME_LABEL.to_owned(), NAME.to_owned())])
}

fn meta(name: &str, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels()),
        ..ObjectMeta::default()
    }
}

fn rule(group: &str, resource: &str, verbs: &[&str], names: Option<&str>) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_owned()]),
        resources: Some(vec![resource.to_owned()]),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        resource_names: names.map(|n| vec![n.to_owned()]),
        ..PolicyRule::default()
    }
}

fn binding(name: &str, namespace: &str, s: &Settings) -> RoleBinding {
    RoleBinding {
        metadata: meta(name, namespace),
        role_ref: RoleRef { api_group: "rbac.authorization.k8s.io".into(), kind: "Role".into(), name: name.into() },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: NAME.into(),
            namespace: Some(s.namespace.clone()),
            ..Subject::default()
        }]),
    }
}

/// Appends the ServiceAccount, then each Role followed by its RoleBinding: the Lease
/// Role when the agent is elected, the discovery Role when it discovers.
pub fn push(s: &Settings, out: &mut Documents) -> Result<(), RenderError> {
    let account = ServiceAccount { metadata: meta(NAME, &s.namespace), ..ServiceAccount::default() };
    out.push("ServiceAccount", &account)?;
    if s.elects() {
        let lease = Role {
            metadata: meta(NAME, &s.namespace),
            rules: Some(vec![
                // Read, acquire, renew and release (an update that clears the holder) of the
                // one Lease. The agent never deletes it, so no `delete`.
                rule("coordination.k8s.io", "leases", &["get", "update"], Some(&s.lease_name)),
                // The first agent creates it. RBAC cannot limit `create` by name (the name is
                // not in the URL), so this rule has no resourceNames.
                rule("coordination.k8s.io", "leases", &["create"], None),
            ]),
        };
        out.push("Role", &lease)?;
        out.push("RoleBinding", &binding(NAME, &s.namespace, s))?;
    }
    if s.discover {
        let name = format!("{NAME}-discovery");
        let discovery = Role {
            metadata: meta(&name, DISCOVERY_NAMESPACE),
            // kube-runtime's watcher lists, then watches; it never gets a single slice.
            rules: Some(vec![rule("discovery.k8s.io", "endpointslices", &["list", "watch"], None)]),
        };
        out.push("Role", &discovery)?;
        out.push("RoleBinding", &binding(&name, DISCOVERY_NAMESPACE, s))?;
    }
    Ok(())
}
