//! holdfast-decap: the backend-side half of DSR (see `node::decap_agent`).

fn main() -> std::process::ExitCode {
    node::decap_agent::main_from(std::env::args())
}
