//! With the `cuda` feature, compiles `cuda/lovasz.cu` (the device steps of the loss) with
//! nvcc into a static library, through cudaforge as candle's own CUDA crates do. nvcc is
//! found through `NVCC`, `PATH` or `CUDA_HOME`; no GPU is needed: without one, set
//! `CUDA_COMPUTE_CAP` (e.g. 90 for H100 / H200), as candle's own build also asks.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::PathBuf;

    const SOURCE: &str = "cuda/lovasz.cu";

    pub fn build() {
        println!("cargo:rerun-if-changed={SOURCE}");
        let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        let builder = cudaforge::KernelBuilder::new()
            .source_files(vec![SOURCE])
            .out_dir(&out_dir)
            .arg("-std=c++17")
            .arg("-O3")
            // No fused multiply-adds: the device rounds like the CPU kernel, step by step.
            .arg("-fmad=false")
            .arg("--expt-relaxed-constexpr");
        if let Err(e) = builder.build_lib(out_dir.join("liblovasz_cuda.a")) {
            panic!("lovasz-candle: building {SOURCE} with nvcc failed: {e:?}");
        }
        println!("cargo:rustc-link-search=native={}", out_dir.display());
        println!("cargo:rustc-link-lib=static=lovasz_cuda");
        println!("cargo:rustc-link-lib=dylib=cudart");
        println!("cargo:rustc-link-lib=dylib=stdc++");
    }
}
