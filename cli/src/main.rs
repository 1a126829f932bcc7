//! The `exitgraph` command line.

/// `println!` that ends the program quietly when stdout is closed (`exitgraph ... | head`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = writeln!(stdout, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

/// `print!` counterpart of [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        if let Err(e) = write!(stdout, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

mod cli;

/// candle allocates a fresh buffer for every tensor it makes. With the system allocator each
/// large one freed goes back to the kernel and the next is page-faulted in again (a quarter of
/// `train lm`'s time on 2 cores went to the kernel); mimalloc, told never to purge, reuses them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the bundled mimalloc's `mi_option_e` (mimalloc.h).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // Keep freed memory for reuse rather than returning it to the kernel after 10 ms. The
    // environment variable MIMALLOC_PURGE_DELAY, read at the allocator's start, is overridden.
    #[allow(unsafe_code)]
    // SAFETY: sets a plain integer option, before this program starts any other thread.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1)
    };
    cli::main()
}
