//! The `memento` binary: a thin shell over [`memento_cli::cli`].

fn main() -> std::process::ExitCode {
    memento_cli::cli::main()
}
