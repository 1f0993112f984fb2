//! Helpers shared by the log store and the state machine.

use openraft::AnyError;

pub(crate) fn any<E: std::error::Error + 'static>(e: E) -> AnyError {
    AnyError::new(&e)
}

/// Run a blocking closure (redb) on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AnyError> + Send + 'static,
) -> Result<T, AnyError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AnyError::error(format!("blocking task failed: {e}")))?
}
