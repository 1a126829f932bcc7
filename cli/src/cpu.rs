//! The CPU's vector and matrix extensions, printed beside every speed figure.

/// The extensions that matter for candle's and PyTorch's CPU kernels, in this order.
const KNOWN: [(&str, &str); 8] = [
    ("avx2", "AVX2"),
    ("fma", "FMA"),
    ("avx512f", "AVX-512F"),
    ("avx512bw", "AVX-512BW"),
    ("avx512_vnni", "AVX-512 VNNI"),
    ("avx512_bf16", "AVX-512 BF16"),
    ("amx_tile", "AMX"),
    ("amx_bf16", "AMX-BF16"),
];

/// The known extensions named in a `/proc/cpuinfo` `flags` line.
pub fn features_from_flags(flags: &str) -> Vec<&'static str> {
    let have: std::collections::HashSet<&str> = flags.split_whitespace().collect();
    KNOWN
        .iter()
        .filter(|(flag, _)| have.contains(flag))
        .map(|(_, name)| *name)
        .collect()
}

/// This machine's extensions: from `/proc/cpuinfo` on Linux, else what the standard
/// library detects at run time (AVX2, FMA, AVX-512F on x86-64).
pub fn features() -> Vec<&'static str> {
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
        if let Some(line) = info.lines().find(|l| l.starts_with("flags")) {
            return features_from_flags(line.split_once(':').map_or("", |(_, f)| f));
        }
    }
    detected()
}

#[cfg(target_arch = "x86_64")]
fn detected() -> Vec<&'static str> {
    let mut v = Vec::new();
    if std::arch::is_x86_feature_detected!("avx2") {
        v.push("AVX2");
    }
    if std::arch::is_x86_feature_detected!("fma") {
        v.push("FMA");
    }
    if std::arch::is_x86_feature_detected!("avx512f") {
        v.push("AVX-512F");
    }
    v
}

#[cfg(not(target_arch = "x86_64"))]
fn detected() -> Vec<&'static str> {
    Vec::new()
}

/// Sets the thread split of an `mkl` build before any candle op runs: MKL's OpenMP threads
/// do the matmuls and candle's elementwise maps (unary and binary ops, its barrier pool,
/// sized by `CANDLE_NUM_THREADS`) run on the calling thread, unless `CANDLE_NUM_THREADS`
/// says otherwise. candle-nn's fused norms, softmax and RoPE keep rayon's pool
/// (`RAYON_NUM_THREADS`): limiting that one too made prefill's softmax twice as slow. With
/// both pools at one thread per core, OpenMP's workers spin after every matmul on the cores
/// candle's workers need: on 2 cores this cost 10-20% of prefill and 2-7% of decode
/// (docs/benchmarks.md). The command line calls it for every command but `train`: a
/// training step's backward pass is elementwise-heavy, and 20 steps of the demo v2 recipe
/// took 97 s with it against 72-80 s without. Without the `mkl` feature it does nothing.
pub fn configure_threads() {
    if cfg!(feature = "mkl") && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Threads of the CPU matmuls: MKL's OpenMP threads in an `mkl` build (`MKL_NUM_THREADS`,
/// then `OMP_NUM_THREADS`, else one per available CPU), candle's thread count otherwise.
pub fn matmul_threads() -> usize {
    let env = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
    };
    if cfg!(feature = "mkl") {
        env("MKL_NUM_THREADS")
            .or_else(|| env("OMP_NUM_THREADS"))
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    } else {
        candle_core::utils::get_num_threads()
    }
}

/// Threads of candle's elementwise maps (its barrier pool): `CANDLE_NUM_THREADS`, else
/// `RAYON_NUM_THREADS`, else one per core, as candle reads them.
pub fn op_threads() -> usize {
    ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"]
        .iter()
        .find_map(|k| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
        })
        .unwrap_or_else(candle_core::utils::get_num_threads)
}

/// Fixes candle's CPU thread count for the process. candle 0.11's CPU matmul asks for its
/// thread count on every call, and without `RAYON_NUM_THREADS` set that parses
/// `/proc/cpuinfo` each time (`num_cpus::get_physical`): on a small model, about a quarter
/// of decode time went to the kernel formatting that file. Setting `RAYON_NUM_THREADS` once,
/// to the count candle computes itself, keeps candle's thread count and removes the
/// per-call read. Rayon's global pool, which otherwise starts one thread per logical CPU,
/// then starts that many too (the same on a machine without simultaneous multithreading).
/// Call it first thing in `main`, before any thread starts; a value the user set is kept.
pub fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_name_the_known_extensions_in_order() {
        let flags = "fpu sse2 amx_tile avx512f avx2 fma avx512_bf16 avx512bw ssse3";
        assert_eq!(
            features_from_flags(flags),
            [
                "AVX2",
                "FMA",
                "AVX-512F",
                "AVX-512BW",
                "AVX-512 BF16",
                "AMX"
            ]
        );
        // A substring of a flag is not the flag.
        assert!(features_from_flags("avx512fx avx").is_empty());
    }
}
