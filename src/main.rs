//! `idiff-studio`: the studio's command line (and, with no arguments, the studio).

use clap::Parser;

fn main() {
    let cli = idiff_studio::cli::Cli::parse();
    match idiff_studio::cli::main_with(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One line: the chain of causes joined by ": ".
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            std::process::exit(1);
        }
    }
}
