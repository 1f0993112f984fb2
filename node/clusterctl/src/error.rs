//! How a command fails, and the exit code of each kind (see `main`).

use holdfast_api::client::ClientError;

pub enum Failure {
    Client(ClientError),
    /// Bad arguments found after parsing (exit 2).
    Usage(String),
    /// No usable credentials (exit 7).
    Auth(String),
    Other(anyhow::Error),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}
