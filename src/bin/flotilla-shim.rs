//! `flotilla-shim <spec>`: the supervisor of one container under the process runtime (see
//! `flotilla::agent::shim`). A binary of its own, with the system allocator and only the
//! shim's code, so each running container costs little memory; `flotilla shim` does the
//! same from the main binary.

fn main() -> std::process::ExitCode {
    let Some(spec) = std::env::args_os().nth(1) else {
        eprintln!("usage: flotilla-shim <spec file>");
        return std::process::ExitCode::from(2);
    };
    std::process::ExitCode::from(flotilla::agent::shim::run(std::path::Path::new(&spec)) as u8)
}
