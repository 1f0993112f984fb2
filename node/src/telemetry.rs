//! Logging and tracing: `HOLDFAST_LOG` (an EnvFilter, default "info"),
//! `HOLDFAST_LOG_FORMAT=json|plain`, and spans exported over OTLP (gRPC) when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use anyhow::{Context, Result};
use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

use crate::config::{ENV_LOG, ENV_LOG_FORMAT};

pub const ENV_OTLP: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Keeps the OTLP pipeline alive; flushes spans when dropped.
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

pub fn init(service: &'static str) -> Result<Telemetry> {
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
    let otel = if std::env::var_os(ENV_OTLP).is_some() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
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
