//! `idiff-studio`: the studio's command line (and, with no arguments, the studio).

use clap::Parser;

/// mimalloc reuses freed tensor buffers; glibc's malloc returns large blocks to the OS and
/// every new tensor then page-faults its memory in again (a quarter of CPU time in sampling).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (the sys crate names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory for 10 s (100 s in mimalloc's arenas) before returning it to the OS:
/// a forward pass frees and re-allocates the same large buffers every few milliseconds, and
/// with mimalloc's default of 10 ms each re-allocation faults its pages in (and the kernel
/// zeroes them) again.
fn keep_freed_memory() {
    // SAFETY: sets a plain integer option; mimalloc reads options atomically.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10_000) };
}

/// candle 0.11 hands element-wise ops on large tensors to a pool of its own threads, besides
/// rayon's, which spin for a while after every op and take a core from the rayon workers
/// that run the kernels (on a 2-core CPU: 10–15 % of a training step). With
/// `CANDLE_NUM_THREADS=1` candle runs them on the calling thread; a value the user set wins.
fn candle_ops_on_calling_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Set before any other thread exists.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn main() {
    keep_freed_memory();
    candle_ops_on_calling_thread();
    // No arguments (or `studio …`): open the studio window.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() == 1 || args.get(1).is_some_and(|a| a == "studio") {
        std::process::exit(idiff_studio::app::launch::main_with_args(args));
    }
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
