//! Compiles the message schemas in `proto/` with prost.
fn main() -> std::io::Result<()> {
    let protos = [
        "proto/drawdown/v1/usage.proto",
        "proto/drawdown/v1/credits.proto",
        "proto/drawdown/v1/balance.proto",
        "proto/drawdown/v1/top_up.proto",
        "proto/drawdown/state/v2/state.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    prost_build::compile_protos(&protos, &["proto/"])
}
