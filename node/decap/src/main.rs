//! holdfast-decap: the backend-side half of DSR (see the library's docs).

fn main() -> std::process::ExitCode {
    holdfast_decap::main_from(std::env::args())
}
