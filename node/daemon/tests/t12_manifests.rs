//! t12: the Kubernetes manifests in deploy/kubernetes/base parse into the
//! k8s-openapi types (required fields present, no field the type does not
//! know), the kustomization lists them, the RBAC grants exactly the calls
//! the controller makes (`k8s::API_CALLS`), the ConfigMap's node.toml is a
//! valid node config and its bird.conf parses with BIRD.

use std::{collections::BTreeSet, path::PathBuf};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, Secret, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde_json::Value;

fn base() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes/base")
}

fn load(file: &str) -> Value {
    let text = std::fs::read_to_string(base().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{file}: not YAML: {e}"))
}

/// Every field of `orig` must survive a round trip through the typed
/// object: a field the type does not know is dropped, and reported here.
fn unknown_fields(orig: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (k, v) in o {
                match t.get(k) {
                    Some(tv) => unknown_fields(v, tv, &format!("{path}.{k}"), out),
                    None if v.is_null() => {}
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(o), Value::Array(t)) => {
            for (i, (a, b)) in o.iter().zip(t).enumerate() {
                unknown_fields(a, b, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(file: &str) -> T {
    let v = load(file);
    let t: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{file}: not a valid object of its kind: {e}"));
    let back = serde_json::to_value(&t).expect("serialize");
    let mut unknown = Vec::new();
    unknown_fields(&v, &back, "", &mut unknown);
    assert!(unknown.is_empty(), "{file}: unknown fields {unknown:?}");
    t
}

fn pod_spec(ds: &DaemonSet) -> &k8s_openapi::api::core::v1::PodSpec {
    ds.spec
        .as_ref()
        .expect("spec")
        .template
        .spec
        .as_ref()
        .expect("pod spec")
}

#[test]
fn t12_manifests_are_valid_objects() {
    let ns: Namespace = typed("namespace.yaml");
    let sa: ServiceAccount = typed("serviceaccount.yaml");
    let role: ClusterRole = typed("clusterrole.yaml");
    let binding: ClusterRoleBinding = typed("clusterrolebinding.yaml");
    let cm: ConfigMap = typed("configmap.yaml");
    let ds: DaemonSet = typed("daemonset-lb.yaml");
    let decap: DaemonSet = typed("daemonset-decap.yaml");
    let _secret: Secret = typed("secret-pki.example.yaml");
    let client_secret: Secret = typed("secret-clusterctl.example.yaml");
    let keys: BTreeSet<&str> = client_secret
        .string_data
        .as_ref()
        .expect("stringData")
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert!(keys.contains("ca.pem") && keys.iter().any(|k| k.starts_with("client-")));

    // The kustomization lists every manifest but the example Secret.
    let k = load("kustomization.yaml");
    let listed: BTreeSet<&str> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    let mut files: BTreeSet<String> = std::fs::read_dir(base())
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    files.retain(|f| !f.ends_with(".example.yaml"));
    assert_eq!(listed, files.iter().map(|s| s.as_str()).collect());
    let nsname = ns.metadata.name.as_deref().expect("ns name");
    assert_eq!(k["namespace"], nsname);

    // The binding gives the role to the DaemonSet's service account.
    let sa_name = sa.metadata.name.as_deref().expect("sa name");
    assert_eq!(
        binding.role_ref.name,
        role.metadata.name.clone().expect("role name")
    );
    let subj = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!(
        (subj.name.as_str(), subj.namespace.as_deref()),
        (sa_name, Some(nsname))
    );
    let pod = pod_spec(&ds);
    assert_eq!(pod.service_account_name.as_deref(), Some(sa_name));
    assert_eq!(pod.host_network, Some(true));

    // RBAC grants exactly the controller's calls, nothing more.
    let mut granted = BTreeSet::new();
    for r in role.rules.as_ref().expect("rules") {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    granted.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    let wanted: BTreeSet<(String, String, String)> = holdfast_k8s::API_CALLS
        .iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
        .collect();
    assert_eq!(granted, wanted, "RBAC must grant exactly k8s::API_CALLS");

    // Containers: only the capabilities needed, probes on the admin API,
    // preStop drains, bpffs and /sys mounted.
    let node_c = pod
        .containers
        .iter()
        .find(|c| c.name == "holdfast-node")
        .expect("node container");
    let caps = node_c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_ne!(
        node_c.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    // The probes use the plain listener (metrics_addr, no client
    // certificate), never the HTTPS admin port.
    let port_of = |name: &str| -> i32 {
        node_c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("container port {name}"))
            .container_port
    };
    let script = node_c.args.as_ref().expect("args").join(" ");
    let env_port = |var: &str| -> i32 {
        script
            .split(&format!("export {var}=\"${{NODE_IP}}:"))
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the start script sets {var}"))
    };
    assert_eq!(port_of("metrics"), env_port("HOLDFAST_METRICS_ADDR"));
    assert_eq!(port_of("admin-https"), env_port("HOLDFAST_ADMIN_ADDR"));
    assert_eq!(port_of("quic"), env_port("HOLDFAST_RAFT_ADDR"));
    for (what, probe, path) in [
        ("readiness", &node_c.readiness_probe, "/ready"),
        ("liveness", &node_c.liveness_probe, "/live"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{what} probe"));
        assert_eq!(get.path.as_deref(), Some(path), "{what}");
        let port = match &get.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(n) => port_of(n),
        };
        assert_eq!(
            port,
            port_of("metrics"),
            "{what} probe on the plain listener"
        );
        assert_ne!(get.scheme.as_deref(), Some("HTTPS"), "{what}");
    }
    // The certificates are read in place from the Secret mount (so a
    // renewed Secret rotates them), and preStop drains with the node's own.
    for var in ["HOLDFAST_TLS_CA", "HOLDFAST_TLS_CERT", "HOLDFAST_TLS_KEY"] {
        assert!(
            script.contains(&format!("export {var}=/etc/holdfast/pki/"))
                || script.contains(&format!("export {var}=\"/etc/holdfast/pki/")),
            "{var} points into the Secret mount: {script}"
        );
    }
    assert!(
        !script.contains("cp "),
        "certificates must not be copied: {script}"
    );
    let pki_mount = node_c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/etc/holdfast/pki")
        .expect("pki mount");
    assert_eq!(pki_mount.read_only, Some(true));
    assert!(
        pki_mount.sub_path.is_none(),
        "a subPath mount never sees Secret updates"
    );
    let pre = serde_json::to_string(&node_c.lifecycle).expect("lifecycle");
    assert!(pre.contains("drain"), "preStop drains: {pre}");
    assert!(
        pre.contains("--cert") && pre.contains("--key") && pre.contains("--ca"),
        "preStop's clusterctl presents the node's certificate: {pre}"
    );
    let mounts: BTreeSet<&str> = node_c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(
        mounts.contains("/sys/fs/bpf") && mounts.contains("/sys") && mounts.contains("/run/bird")
    );
    assert!(
        pod.containers.iter().any(|c| c.name == "bird"),
        "BIRD sidecar"
    );

    // The decap DaemonSet: on every node but the LB nodes, host network,
    // only its capabilities, ready once attached, its VIPs = the CIDRs the
    // LB nodes announce (bird.conf's static routes).
    let dpod = pod_spec(&decap);
    assert_eq!(dpod.host_network, Some(true));
    let aff = serde_json::to_string(&dpod.affinity).expect("affinity");
    assert!(
        aff.contains("holdfast.io/lb") && aff.contains("NotIn"),
        "decap must stay off the LB nodes (their NIC runs the LB program): {aff}"
    );
    let dc = &dpod.containers[0];
    let script = dc.args.as_ref().expect("args").join(" ");
    assert!(
        script.contains("holdfast-decap")
            && script.contains("--ready-file /run/holdfast-decap/ready")
    );
    let probe = serde_json::to_string(&dc.readiness_probe).expect("probe");
    assert!(probe.contains("/run/holdfast-decap/ready"), "{probe}");
    let dcaps = dc
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .expect("capabilities");
    assert_eq!(dcaps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let envs: BTreeSet<String> = dc
        .env
        .iter()
        .flatten()
        .filter_map(|e| e.value_from.as_ref()?.config_map_key_ref.as_ref())
        .map(|r| r.key.clone())
        .collect();
    let data = cm.data.as_ref().expect("data");
    for key in &envs {
        assert!(data.contains_key(key), "the ConfigMap has no {key}");
    }
    let announced: BTreeSet<&str> = data["bird.conf"]
        .split("route ")
        .skip(1)
        .filter_map(|r| r.split_whitespace().next())
        .collect();
    let decap_vips: BTreeSet<&str> = data["decap_vips"].split_whitespace().collect();
    assert_eq!(
        decap_vips, announced,
        "decap_vips must be the announced VIP CIDRs"
    );

    // The ConfigMap's node.toml is a valid config once the start script's
    // environment is applied; its bird.conf parses with BIRD.
    let mut cfg =
        holdfast_node::config::NodeConfig::parse(&data["node.toml"]).expect("node.toml parses");
    cfg.apply_env(|k| match k {
        "HOLDFAST_NODE_ID" => Some("11".into()),
        "HOLDFAST_RAFT_ADDR" => Some("10.0.0.11:7001".into()),
        "HOLDFAST_ADMIN_ADDR" => Some("10.0.0.11:7101".into()),
        "HOLDFAST_METRICS_ADDR" => Some("10.0.0.11:7102".into()),
        "HOLDFAST_JOIN" => Some(data["join"].clone()),
        _ => None,
    })
    .expect("environment");
    cfg.validate().expect("node.toml validates");
    assert!(cfg.kubernetes.enabled && cfg.bgp.enabled);
    let dir = tempfile::tempdir().expect("tempdir");
    let bird = dir.path().join("bird.conf");
    std::fs::write(&bird, &data["bird.conf"]).expect("write");
    let out = std::process::Command::new("bird")
        .arg("-p")
        .arg("-c")
        .arg(&bird)
        .output()
        .expect("bird2 must be installed (scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "bird.conf: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
