//! The rules Kubernetes checks object names against (apimachinery's `IsDNS1123Label`
//! and `IsDNS1123Subdomain`), shared by the manifests and the agent's own flags, so a
//! bad name is refused at once instead of by every API call (or by `kubectl apply`).

/// Which rule a name follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    /// Namespaces: one label, at most 63 characters.
    Label,
    /// Most object names (a Lease's, a node's): dot-separated labels, at most 253.
    Subdomain,
}

impl NameRule {
    /// `Err` with what the name should be if `name` breaks the rule.
    pub fn check(self, name: &str) -> Result<(), &'static str> {
        // One dot-separated part: lowercase alphanumerics and '-', alphanumeric at both
        // ends. A label is one such part of at most 63; a subdomain limits only its whole
        // length (apimachinery's regex has no per-part limit).
        let part_ok = |l: &str| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        let label_ok = |l: &str| l.len() <= 63 && part_ok(l);
        let ok = match self {
            NameRule::Label => label_ok(name),
            NameRule::Subdomain => name.len() <= 253 && name.split('.').all(part_ok),
        };
        if ok {
            return Ok(());
        }
        Err(match self {
            NameRule::Label => "not a DNS-1123 label (lowercase letters, digits and '-', at most 63)",
            NameRule::Subdomain => "not a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', at most 253)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_subdomains_as_kubernetes_checks_them() {
        for ok in ["kube-system", "a", "n1", &"a".repeat(63)] {
            assert_eq!(NameRule::Label.check(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Kube", "kube.system", "-a", "a-", "a_b", &"a".repeat(64)] {
            assert!(NameRule::Label.check(bad).is_err(), "{bad}");
        }
        // A part longer than 63 is fine in a subdomain (only the whole is limited).
        for ok in ["vip-control-plane", "node-1.example.com", &format!("{}.{}", "a".repeat(63), "b".repeat(100))] {
            assert_eq!(NameRule::Subdomain.check(ok), Ok(()), "{ok}");
        }
        for bad in ["", "a..b", ".a", "VIP", "a_b", &["a"; 128].join(".")] {
            assert!(NameRule::Subdomain.check(bad).is_err(), "{bad}");
        }
    }
}
