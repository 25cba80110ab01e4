//! Runs one reference workload and prints its record as one JSON line:
//! `bench-workload NAME [--warmup N] [--steps N]`, or `bench-workload --probe`.
//! `cargo xtask bench --vs-pytorch` alternates it with the PyTorch reference. It is also
//! the thing to profile: `perf record -g target/release/bench-workload minilm_train_seq_bn`.

fn main() -> anyhow::Result<()> {
    adapters_kernels::tune_cpu_runtime();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--probe") {
        println!("{}", serde_json::json!({ "sgemm1024_gflops": adapters_bench::workloads::sgemm_gflops() }));
        return Ok(());
    }
    let Some(name) = args.first().filter(|a| !a.starts_with('-')) else {
        anyhow::bail!("usage: bench-workload NAME [--warmup N] [--steps N]; names: {}", adapters_bench::workloads::NAMES.join(", "));
    };
    let flag = |f: &str, default: usize| -> anyhow::Result<usize> {
        match args.iter().position(|a| a == f) {
            Some(i) => Ok(args.get(i + 1).ok_or_else(|| anyhow::anyhow!("{f} needs a number"))?.parse()?),
            None => Ok(default),
        }
    };
    let record = adapters_bench::workloads::run(name, flag("--warmup", 1)?, flag("--steps", 3)?)?;
    println!("{record}");
    Ok(())
}
