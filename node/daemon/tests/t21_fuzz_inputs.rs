//! t21: property tests over generated and mutated inputs (cargo-fuzz needs
//! nightly; these run a few thousand cases each on stable).
//!
//! - Admin API JSON bodies: valid requests for every write endpoint and
//!   operation, then mutated (a leaf replaced by another JSON type, a key
//!   dropped or added, bytes flipped, cut short, junk), sent over HTTPS to a
//!   real node. Every answer is 2xx or a 4xx with a JSON error naming the
//!   problem — never a 5xx, never a dropped connection — and the node keeps
//!   serving; the config epoch counts exactly the writes that were answered
//!   200.
//! - node.toml: the shipped example mutated (lines dropped or duplicated,
//!   values replaced, bytes flipped, cut short) and the `HOLDFAST_*`
//!   overrides given random strings: parsing and validation answer Ok or an
//!   error that names what is wrong, and never panic.

use std::time::Duration;

use holdfast_api::wire::ApiError;
use holdfast_node::config::{NodeConfig, RaftTuning};
use holdfast_node::testing::{service, Cluster};
use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};
use serde_json::{json, Value};

/// Valid bodies for each write endpoint (the seeds of the mutations).
fn seeds() -> Vec<(&'static str, Value)> {
    let cmd = |c: Value| json!({"id": null, "command": c});
    vec![
        (
            "/command",
            cmd(
                json!({"op": "put_service", "service": {"name": "s1", "vip": "10.200.0.9", "port": 53, "proto": "udp", "table_size": 251}}),
            ),
        ),
        (
            "/command",
            cmd(
                json!({"op": "add_backend", "service": "web", "addr": "10.0.0.7", "port": 80, "weight": 1}),
            ),
        ),
        ("/command", cmd(json!({"op": "remove_backend", "id": 1}))),
        (
            "/command",
            cmd(json!({"op": "set_backend_state", "id": 1, "state": "draining"})),
        ),
        (
            "/command",
            cmd(json!({"op": "set_backend_weight", "id": 1, "weight": 3})),
        ),
        (
            "/command",
            cmd(json!({"op": "remove_service", "name": "s1"})),
        ),
        (
            "/command",
            cmd(json!({"op": "put_vip_pool", "pool": {"name": "p", "cidr": "10.210.0.0/24"}})),
        ),
        (
            "/command",
            cmd(json!({"op": "remove_vip_pool", "name": "p"})),
        ),
        (
            "/command",
            cmd(
                json!({"op": "revoke_certificate", "revocation": {"serial": "7f00aa", "note": "x"}}),
            ),
        ),
        (
            "/command",
            cmd(json!({"op": "unrevoke_certificate", "serial": "7f00aa"})),
        ),
        (
            "/command",
            cmd(json!({"op": "remove_member", "node_id": 42})),
        ),
        (
            "/command",
            cmd(json!({"op": "batch", "commands": [
            {"op": "add_backend", "service": "web", "addr": "10.0.0.8", "port": 80, "weight": 1},
            {"op": "set_backend_weight", "id": 2, "weight": 2}]})),
        ),
        (
            "/cluster/join",
            json!({"node_id": 0, "raft_addr": "127.0.0.1:9", "admin_addr": "127.0.0.1:10"}),
        ),
        ("/cluster/remove", json!({"node_id": 42})),
        ("/drain", json!({"drain": false})),
        (
            "/command",
            cmd(
                json!({"op": "put_service", "service": {"name": "s2", "vip": "10.200.0.10", "port": 80, "proto": "tcp", "table_size": 251,
                    "health_check": {"type": "http", "path": "/healthz", "interval_ms": 1000, "timeout_ms": 500, "rise": 2, "fall": 3, "on_down": "keep"}}}),
            ),
        ),
        (
            "/command",
            cmd(json!({"op": "set_backend_health", "id": 0, "health": "up"})),
        ),
        (
            "/health/report",
            json!({"node_id": 1, "views": [{"backend_id": 0, "service": "web", "addr": "10.0.0.1", "port": 80,
                "up": false, "detail": "x", "latency_ms": 1.0, "checks": 1, "transitions": 1}]}),
        ),
        (
            "/tables/report",
            json!({"node_id": 1, "live": 5, "prepared": 7}),
        ),
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::String),
        Just(json!(u64::MAX)),
        Just(json!("10.0.0.1")),
        Just(json!("::1")),
        Just(json!(-1)),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Replace the `k`-th leaf (depth first) of `v` by `with`.
fn replace_leaf(v: &mut Value, k: &mut usize, with: &Value) -> bool {
    match v {
        Value::Object(m) => m.values_mut().any(|x| replace_leaf(x, k, with)),
        Value::Array(a) => a.iter_mut().any(|x| replace_leaf(x, k, with)),
        leaf => {
            if *k == 0 {
                *leaf = with.clone();
                true
            } else {
                *k -= 1;
                false
            }
        }
    }
}

/// Drop or add a key in the `k`-th object of `v`.
fn touch_object(v: &mut Value, k: &mut usize, add: Option<(&str, &Value)>) -> bool {
    if let Value::Object(m) = v {
        if *k == 0 {
            match add {
                Some((key, val)) => {
                    m.insert(key.into(), val.clone());
                }
                None => {
                    let first = m.keys().next().cloned();
                    if let Some(f) = first {
                        m.remove(&f);
                    }
                }
            }
            return true;
        }
        *k -= 1;
        return m.values_mut().any(|x| touch_object(x, k, add));
    }
    if let Value::Array(a) = v {
        return a.iter_mut().any(|x| touch_object(x, k, add));
    }
    false
}

#[derive(Debug, Clone)]
enum Mutation {
    None,
    Leaf(usize, Value),
    DropKey(usize),
    AddKey(usize, String, Value),
    Flip(usize, u8),
    Cut(usize),
    Junk(Vec<u8>),
    Whole(Value),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => Just(Mutation::None),
        4 => (0usize..12, any_json()).prop_map(|(k, v)| Mutation::Leaf(k, v)),
        2 => (0usize..4).prop_map(Mutation::DropKey),
        2 => (0usize..4, "[a-z_]{1,8}", any_json()).prop_map(|(k, s, v)| Mutation::AddKey(k, s, v)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        2 => any::<usize>().prop_map(Mutation::Cut),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Mutation::Junk),
        1 => any_json().prop_map(Mutation::Whole),
    ]
}

fn apply(seed: &Value, m: &Mutation) -> Vec<u8> {
    let mut v = seed.clone();
    match m {
        Mutation::None => {}
        Mutation::Leaf(k, with) => {
            replace_leaf(&mut v, &mut k.clone(), with);
        }
        Mutation::DropKey(k) => {
            touch_object(&mut v, &mut k.clone(), None);
        }
        Mutation::AddKey(k, key, val) => {
            touch_object(&mut v, &mut k.clone(), Some((key, val)));
        }
        Mutation::Whole(w) => v = w.clone(),
        _ => {}
    }
    let mut b = serde_json::to_vec(&v).expect("json");
    match m {
        Mutation::Flip(i, x) if !b.is_empty() => {
            let i = i % b.len();
            b[i] ^= x | 1;
        }
        Mutation::Cut(i) if !b.is_empty() => b.truncate(i % b.len()),
        Mutation::Junk(j) => b = j.clone(),
        _ => {}
    }
    b
}

/// Bodies whose effect is slow or would take the test's only voter away
/// (a real join waits for the learner to catch up): sent as generated,
/// but the generator never produces them.
fn harmful(path: &str, body: &[u8]) -> bool {
    match path {
        "/cluster/join" => serde_json::from_slice::<raft_store::cluster::Member>(body)
            .is_ok_and(|m| m.node_id != 0),
        "/cluster/remove" => serde_json::from_slice::<holdfast_api::wire::RemoveRequest>(body)
            .is_ok_and(|r| r.node_id == 1),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t21_admin_api_bodies_get_clear_answers() {
    let c = Cluster::start_with(1, RaftTuning::default(), false).await;
    c.write(service("web", "10.200.0.1", 80)).await;
    let epoch0 = c.wait_converged(Duration::from_secs(5)).await;
    let client = c.client();
    let addr = c.node(1).cfg.admin_addr.to_string();
    let node = c.node(1).clone();
    let (accepted, cases) = tokio::task::spawn_blocking(move || {
        let seeds = seeds();
        let mut runner = TestRunner::new(Config {
            cases: 3000,
            failure_persistence: None,
            ..Config::default()
        });
        let accepted = std::cell::Cell::new(0u64);
        let cases = std::cell::Cell::new(0u64);
        runner
            .run(&(0..seeds.len(), mutation()), |(i, m)| {
                let (path, seed) = &seeds[i];
                let body = apply(seed, &m);
                if harmful(path, &body) {
                    return Ok(());
                }
                cases.set(cases.get() + 1);
                let (status, answer) = client
                    .post_raw(&addr, path, &body, Duration::from_secs(10))
                    .map_err(|e| TestCaseError::fail(format!("{path} {m:?}: {e}")))?;
                let text = String::from_utf8_lossy(&answer);
                prop_assert!(
                    (200..300).contains(&status) || (400..500).contains(&status),
                    "{path} {m:?} -> {status}: {text}"
                );
                if (400..500).contains(&status) {
                    let e: ApiError = serde_json::from_slice(&answer).map_err(|e| {
                        TestCaseError::fail(format!(
                            "{path} -> {status}, not a JSON error: {e}: {text}"
                        ))
                    })?;
                    prop_assert!(!e.error.is_empty() && !e.kind.is_empty(), "{text}");
                } else if *path == "/command" {
                    let r: raft_store::Response = serde_json::from_slice(&answer)
                        .map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
                    prop_assert!(r.rejected.is_none());
                    accepted.set(accepted.get() + 1);
                }
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
        (accepted.get(), cases.get())
    })
    .await
    .expect("fuzz task");
    assert!(cases >= 2500, "only {cases} cases sent");
    // Every 200 was one committed epoch, nothing else changed the config.
    let epoch = c.wait_converged(Duration::from_secs(5)).await;
    assert_eq!(epoch, epoch0 + accepted, "epochs vs accepted writes");
    assert!(
        accepted > 0 && accepted < cases,
        "{accepted} of {cases} accepted"
    );
    eprintln!("t21: {cases} bodies, {accepted} applied, the rest refused with a 4xx");
    let st = node.sm.current();
    assert_eq!(st.state.epoch, epoch);
    let _ = c
        .client()
        .get_async::<holdfast_api::wire::LocalStatus>(
            &c.node(1).cfg.admin_addr.to_string(),
            "/status",
            Duration::from_secs(5),
        )
        .await
        .expect("still serving");
}

#[derive(Debug, Clone)]
enum TomlMutation {
    DropLine(usize),
    DupLine(usize),
    Value(usize, String),
    Flip(usize, u8),
    Cut(usize),
}

fn toml_mutation() -> impl Strategy<Value = TomlMutation> {
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("18446744073709551616".to_string()),
        Just("true".to_string()),
        Just("\"\"".to_string()),
        Just("\"0.0.0.0:0\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        "\"[ -~]{0,12}\"".prop_map(|s| s.replace('\\', "")),
    ];
    prop_oneof![
        any::<usize>().prop_map(TomlMutation::DropLine),
        any::<usize>().prop_map(TomlMutation::DupLine),
        (any::<usize>(), value).prop_map(|(i, v)| TomlMutation::Value(i, v)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| TomlMutation::Flip(i, b)),
        any::<usize>().prop_map(TomlMutation::Cut),
    ]
}

fn mutate_toml(text: &str, ms: &[TomlMutation]) -> Vec<u8> {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for m in ms {
        let n = lines.len().max(1);
        match m {
            TomlMutation::DropLine(i) if !lines.is_empty() => {
                lines.remove(i % n);
            }
            TomlMutation::DupLine(i) if !lines.is_empty() => {
                let l = lines[i % n].clone();
                lines.insert(i % n, l);
            }
            TomlMutation::Value(i, v) if !lines.is_empty() => {
                let l = &mut lines[i % n];
                if let Some((k, _)) = l.split_once('=') {
                    *l = format!("{k}= {v}");
                }
            }
            _ => {}
        }
    }
    let mut b = lines.join("\n").into_bytes();
    for m in ms {
        match m {
            TomlMutation::Flip(i, x) if !b.is_empty() => {
                let i = i % b.len();
                b[i] ^= x | 1;
            }
            TomlMutation::Cut(i) if !b.is_empty() => b.truncate(i % b.len()),
            _ => {}
        }
    }
    b
}

#[test]
fn t21_node_toml_and_overrides_never_panic() {
    let example = include_str!("../../../deploy/baremetal/node.example.toml");
    let mut runner = TestRunner::new(Config {
        cases: 4000,
        failure_persistence: None,
        ..Config::default()
    });
    let refused = std::cell::Cell::new(0u32);
    runner
        .run(&prop::collection::vec(toml_mutation(), 1..4), |ms| {
            let bytes = mutate_toml(example, &ms);
            let text = String::from_utf8_lossy(&bytes);
            match NodeConfig::parse(&text) {
                Err(e) => {
                    prop_assert!(!e.is_empty());
                    refused.set(refused.get() + 1);
                }
                Ok(cfg) => {
                    if let Err(e) = cfg.validate() {
                        let msg = e.to_string();
                        prop_assert!(msg.starts_with("invalid "), "{msg}");
                        refused.set(refused.get() + 1);
                    }
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        refused.get() > 1000,
        "mutations were refused {} times",
        refused.get()
    );

    // Environment overrides with random values: Ok, or an error naming the
    // variable.
    let vars = [
        holdfast_node::config::ENV_NODE_ID,
        holdfast_node::config::ENV_RAFT_ADDR,
        holdfast_node::config::ENV_ADMIN_ADDR,
        holdfast_node::config::ENV_METRICS_ADDR,
        holdfast_node::config::ENV_JOIN,
    ];
    let base = NodeConfig::parse(example).expect("example parses");
    runner
        .run(&(0..vars.len(), ".{0,30}"), |(i, v)| {
            let mut cfg = base.clone();
            match cfg.apply_env(|k| (k == vars[i]).then(|| v.clone())) {
                Ok(()) => {
                    let _ = cfg.validate();
                }
                Err(e) => prop_assert!(e.to_string().contains(vars[i]), "{e}"),
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
}
