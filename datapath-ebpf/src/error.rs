//! The datapath crate's error type.

use std::path::PathBuf;

/// Errors of the datapath API. Configuration errors name the bad field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {field}: {reason}")]
    InvalidConfig { field: String, reason: String },

    #[error("loading BPF object {object}: {source}")]
    Load {
        object: &'static str,
        #[source]
        source: Box<aya::EbpfError>,
    },

    #[error("BPF program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    #[error("BPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },

    #[error("BPF map {map} missing from the object")]
    MissingMap { map: &'static str },

    #[error("{call} on map {map}: {source}")]
    Syscall {
        call: &'static str,
        map: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("pinned state at {path}: {reason}")]
    Pinned { path: PathBuf, reason: String },

    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("interface {name} not found")]
    UnknownInterface { name: String },
}

impl Error {
    pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidConfig {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn map(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Self {
        move |e| Self::Map {
            map,
            source: Box::new(e),
        }
    }

    pub(crate) fn program(
        program: &'static str,
    ) -> impl FnOnce(aya::programs::ProgramError) -> Self {
        move |e| Self::Program {
            program,
            source: Box::new(e),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
