//! Logging and tracing: `HOLDFAST_LOG` (an EnvFilter, default "info"),
//! `HOLDFAST_LOG_FORMAT=json|plain`, and spans exported over OTLP (gRPC) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! A config change is one trace across the cluster: the span that submits
//! a Raft write (`raft_write`, e.g. inside the Kubernetes controller's
//! `k8s_reconcile`) puts its W3C `traceparent` into the request; every node
//! that applies the entry programs its datapath in a `datapath_apply` span
//! whose parent is that context.

use anyhow::{Context, Result};
use opentelemetry::{
    propagation::TextMapPropagator,
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

use crate::config::{ENV_LOG, ENV_LOG_FORMAT};

pub const ENV_OTLP: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Keeps the OTLP pipeline alive; flushes spans when dropped.
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Export every finished span now (tests; before a planned exit).
    pub fn flush(&self) -> Result<()> {
        if let Some(p) = &self.provider {
            p.force_flush()
                .context("flushing spans to the OTLP endpoint")?;
        }
        Ok(())
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Logging, and OTLP export when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub fn init(service: &'static str) -> Result<Telemetry> {
    init_with(service, std::env::var(ENV_OTLP).ok())
}

/// Logging, and OTLP export (gRPC) to `otlp` when given.
pub fn init_with(service: &'static str, otlp: Option<String>) -> Result<Telemetry> {
    let filter = EnvFilter::try_from_env(ENV_LOG).unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var(ENV_LOG_FORMAT).is_ok_and(|v| v == "json");
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };
    let mut provider = None;
    let otel = if let Some(endpoint) = otlp {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .context("OTLP exporter")?;
        let p = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service)
                    .build(),
            )
            .build();
        let tracer = p.tracer(service);
        provider = Some(p);
        Some(tracing_opentelemetry::layer().with_tracer(tracer))
    } else {
        None
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .context("installing the tracing subscriber")?;
    Ok(Telemetry { provider })
}

/// The current span's W3C `traceparent`, when it is being traced.
pub fn traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Continue the traces of `traceparents` in `span`: the first becomes its
/// parent, the others links. Malformed values are ignored.
pub fn continue_traces<'a>(span: &tracing::Span, traceparents: impl IntoIterator<Item = &'a str>) {
    let mut parent_set = false;
    for tp in traceparents {
        let carrier =
            std::collections::HashMap::from([("traceparent".to_string(), tp.to_string())]);
        let cx = TraceContextPropagator::new().extract(&carrier);
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            continue;
        }
        if !parent_set {
            parent_set = span.set_parent(cx).is_ok();
        } else {
            span.add_link(sc);
        }
    }
}
