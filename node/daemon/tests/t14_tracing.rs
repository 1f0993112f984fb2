//! t14: a config change is one trace across the cluster, exported over OTLP.
//!
//! An OTLP/gRPC trace receiver runs inside the test; the process's tracing
//! is set up by `holdfast_node::telemetry::init_with` (what holdfast-node does when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set). The Kubernetes controller of a
//! 3-node cluster turns a new Service and its EndpointSlice into Raft
//! config; the receiver must get, in one trace: the controller's
//! `k8s_reconcile` span, its child `raft_write` (the commit), and a
//! `datapath_apply` span on each of the three nodes whose parent is that
//! `raft_write` — a parent the followers can only know from the trace
//! context carried in the replicated log entry.

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use holdfast_k8s::testapi::{Kind, TestApi};
use holdfast_node::testing::Cluster;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::any_value::Value as AnyValue,
    trace::v1::Span,
};
use raft_store::{cluster::VipPool, Command};
use serde_json::json;

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<usize>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("spans");
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        *self.requests.lock().expect("requests") += 1;
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn start_receiver() -> (Receiver, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the OTLP receiver");
    let addr = listener.local_addr().expect("addr");
    let r = Receiver::default();
    let svc = TraceServiceServer::new(r.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
            .expect("OTLP receiver");
    });
    (r, addr)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn int_attr(s: &Span, key: &str) -> Option<i64> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(AnyValue::IntValue(i)) => Some(*i),
            Some(AnyValue::StringValue(s)) => s.parse().ok(),
            _ => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t14_k8s_change_to_every_datapath_is_one_trace() {
    let (receiver, addr) = start_receiver().await;
    let telemetry =
        holdfast_node::telemetry::init_with("holdfast-t14", Some(format!("http://{addr}")))
            .expect("tracing with OTLP export");

    let api = TestApi::start().await.expect("test API server");
    let dir = tempfile::tempdir().expect("tempdir");
    let k = api.k8s_section(dir.path()).expect("kubernetes section");
    let c = Cluster::start_full(3, Default::default(), true, k).await;
    let r = c
        .write(Command::PutVipPool {
            pool: VipPool {
                name: "v4".into(),
                cidr: "10.214.0.0/28".into(),
                ..Default::default()
            },
        })
        .await;
    assert!(r.rejected.is_none(), "{:?}", r.rejected);

    api.apply(
        Kind::Service,
        json!({
            "metadata": {"name": "traced", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "loadBalancerClass": "holdfast.io/l4",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
        }),
    );
    api.apply(
        Kind::EndpointSlice,
        json!({
            "metadata": {"name": "traced-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "traced"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.14.1"], "conditions": {"ready": true}},
                          {"addresses": ["10.1.14.2"], "conditions": {"ready": true}}],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        }),
    );
    // Every node's datapath runs an epoch with both backends.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let done = c.nodes.values().all(|n| {
            let cur = n.sm.current();
            n.applied_epoch.load(std::sync::atomic::Ordering::Relaxed) == cur.state.epoch
                && cur
                    .state
                    .backends
                    .values()
                    .filter(|b| b.service.contains("default/traced"))
                    .count()
                    == 2
        });
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Service never reached every datapath"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Find the trace: k8s_reconcile (commands > 0) → raft_write →
    // datapath_apply on nodes 1, 2, 3.
    let deadline = Instant::now() + Duration::from_secs(20);
    let found = loop {
        telemetry.flush().expect("flush spans");
        let spans = receiver.spans.lock().expect("spans").clone();
        let by_id: HashMap<Vec<u8>, &Span> = spans.iter().map(|s| (s.span_id.clone(), s)).collect();
        let hit = spans
            .iter()
            .filter(|s| s.name == "k8s_reconcile" && int_attr(s, "commands").unwrap_or(0) > 0)
            .find_map(|rec| {
                let writes: Vec<&Span> = spans
                    .iter()
                    .filter(|s| s.name == "raft_write" && s.parent_span_id == rec.span_id)
                    .collect();
                writes.iter().find_map(|w| {
                    let applies: Vec<&Span> = spans
                        .iter()
                        .filter(|s| s.name == "datapath_apply" && s.parent_span_id == w.span_id)
                        .collect();
                    let nodes: BTreeSet<i64> =
                        applies.iter().filter_map(|s| int_attr(s, "node")).collect();
                    (nodes == BTreeSet::from([1, 2, 3])).then(|| (rec, *w, applies.clone()))
                })
            })
            .map(|(rec, w, applies)| {
                (
                    rec.clone(),
                    w.clone(),
                    applies.into_iter().cloned().collect::<Vec<_>>(),
                    by_id.len(),
                )
            });
        if let Some(f) = hit {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "no trace k8s_reconcile → raft_write → datapath_apply on nodes 1-3 among {} spans \
             ({} export requests); names: {:?}",
            spans.len(),
            *receiver.requests.lock().expect("requests"),
            spans
                .iter()
                .map(|s| format!(
                    "{} id={} parent={} trace={} node={:?} commands={:?} {:?}",
                    s.name,
                    hex(&s.span_id),
                    hex(&s.parent_span_id),
                    hex(&s.trace_id),
                    int_attr(s, "node"),
                    int_attr(s, "commands"),
                    s.attributes
                ))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (rec, write, applies, _) = found;
    // One trace id end to end.
    assert_eq!(write.trace_id, rec.trace_id);
    for a in &applies {
        assert_eq!(a.trace_id, rec.trace_id, "datapath_apply in another trace");
        assert!(
            int_attr(a, "epoch").unwrap_or(0) > 0,
            "datapath_apply without its epoch"
        );
        assert!(
            a.start_time_unix_nano >= write.start_time_unix_nano,
            "a datapath applied the change before it was written"
        );
    }
    assert!(
        rec.parent_span_id.is_empty(),
        "the reconcile is the trace root"
    );
    assert!(
        int_attr(&rec, "events").unwrap_or(0) >= 1,
        "the reconcile does not say how many watch events led to it"
    );
    drop(c);
}
