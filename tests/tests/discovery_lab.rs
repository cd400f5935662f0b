//! `--discover kubernetes`: the agent learns the apiservers from the EndpointSlices of
//! `default/kubernetes` (served by the API stand-in, reached through the agent's normal
//! kubeconfig path), health-checks them, and keeps the table to registered and healthy
//! ones as registrations come and go.
//!
//! Needs root.

use std::time::Duration;

use tests::{
    agent::{wait_until, Agent},
    apilab::ApiLab,
};

fn table_backends(lab: &ApiLab) -> Vec<(String, bool)> {
    lab.status(0)
        .ok()
        .and_then(|s| {
            s["services"][0]["backends"].as_array().map(|b| {
                b.iter()
                    .map(|b| (b["backend"].as_str().unwrap_or("").to_owned(), b["healthy"].as_bool().unwrap_or(false)))
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn healthy_set(lab: &ApiLab, nodes: &[usize]) -> bool {
    let mut want: Vec<String> = nodes.iter().map(|&i| lab.nodes[i].ip.to_string()).collect();
    want.sort();
    let mut got: Vec<String> = table_backends(lab).into_iter().filter(|(_, h)| *h).map(|(b, _)| b).collect();
    got.sort();
    got == want
}

#[test]
fn discovered_apiservers_follow_the_endpointslices() {
    let mut lab = ApiLab::new([10, 78, 0], 3, &[0]).unwrap().with_lease_api().unwrap();
    lab.static_backends = false;
    lab.register_apiservers(&[0, 1]).unwrap();
    let kc = lab.pki.dir.join("n1.kubeconfig").display().to_string();
    let args = lab.agent_args(0, &["--discover", "kubernetes", "--kubeconfig", &kc]).unwrap();
    assert!(!args.iter().any(|a| a == "--backend"), "this test relies on discovery alone");
    let _agent = Agent::spawn(lab.ns(0), &args).unwrap();

    assert!(wait_until(Duration::from_secs(10), || healthy_set(&lab, &[0, 1])), "{:?}", table_backends(&lab));
    let (counts, errors) = lab.requests(60);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(!counts.contains_key("n3") && counts.len() == 2, "{counts:?}");

    // A third apiserver registers: it joins the table.
    lab.register_apiservers(&[0, 1, 2]).unwrap();
    assert!(wait_until(Duration::from_secs(5), || healthy_set(&lab, &[0, 1, 2])), "{:?}", table_backends(&lab));
    let (counts, errors) = lab.requests(60);
    assert!(errors.is_empty() && counts.get("n3").copied().unwrap_or(0) > 0, "{counts:?} {errors:?}");

    // One deregisters: it leaves, though its apiserver is still healthy.
    lab.register_apiservers(&[0, 2]).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || table_backends(&lab)
            .iter()
            .all(|(b, _)| *b != lab.nodes[1].ip.to_string())),
        "{:?}",
        table_backends(&lab)
    );
    let (counts, errors) = lab.requests(60);
    assert!(errors.is_empty() && !counts.contains_key("n2"), "{counts:?} {errors:?}");
}
