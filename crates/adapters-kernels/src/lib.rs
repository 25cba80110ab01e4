//! Fused CPU kernels for the training and inference hot paths of backbones and adapter
//! families, each a candle custom op with a hand-written backward pass.
//!
//! Why: composed from candle's primitives, one BERT layer is ~60 graph nodes, each a full
//! pass over memory with a fresh allocation, and candle's backward of a matmul computes
//! the gradient of frozen weights too. A fused op makes one pass, and its backward returns
//! gradients only for the inputs that track them.
//!
//! Every kernel has a composed twin built from candle ops, used on other devices (CUDA,
//! Metal), for other dtypes, and when `ADAPTERS_COMPOSED_OPS=1` is set; tests check the two
//! agree in value and gradient.

mod adamw;
mod attention;
mod bottleneck;
mod cross_entropy;
mod decode_attention;
mod experts;
mod gelu;
mod int8;
mod int8_gemm;
mod linear;
mod mixture;
mod norm;
mod rope;
mod rows;
pub(crate) mod simd;
mod swiglu;

pub use adamw::{adamw, AdamWStep};
pub use attention::attention;
pub use bottleneck::{bottleneck_add_layer_norm, Bottleneck, BottleneckInput};
pub use cross_entropy::linear_cross_entropy;
pub use decode_attention::attention_per_row;
pub use experts::{expert_mix, Activation, Experts, Routes};
pub use gelu::gelu_erf;
pub use int8::{Int8Weight, BLOCK as INT8_BLOCK};
pub use int8_gemm::{has_vnni, Int8Matrix};
pub use linear::{gelu_linear, linear, linear_add, low_rank_linear, swiglu_linear, transposed_storage};
pub use mixture::{mixture_add_layer_norm, RouteRow, RoutedExperts};
pub use norm::{add_layer_norm, layer_norm, rms_norm};
pub use rope::rope;
pub use rows::{row_layer_norm, row_linear};
pub use swiglu::swiglu;

use candle_core::{CpuStorage, DType, Error, Layout, Result, Storage, Tensor};
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Tunes the process for CPU training and inference; call once at the start of a
/// program, before any other thread exists.
///
/// 1. Makes glibc keep freed tensor buffers for reuse. Each kernel allocates its output,
///    and a BERT training step allocates and frees ~1 GB in buffers of 1-25 MB. glibc's
///    defaults return such buffers to the kernel on free (`munmap`, or trimming the
///    heap), so every step faults them in again page by page and flushes TLBs: ~15% of a
///    MiniLM training step here. Raising the mmap threshold to its maximum (32 MiB) and
///    the trim threshold out of reach keeps them in the heap (glibc on Linux only).
/// 2. Stops candle's elementwise thread pool spinning between operations (unless
///    `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set): after each candle elementwise op its
///    workers spin for ~25,000 iterations, taking a core from the gemm and kernel
///    threads that run next: 6-7% of a SmolLM2 training step's CPU time on 2 cores.
pub fn tune_cpu_runtime() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before heavy allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    const SPIN: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(SPIN).is_none() {
        // The caller runs this before starting threads, so nothing reads the environment
        // concurrently (candle reads this variable when its pool first starts).
        std::env::set_var(SPIN, "0");
    }
}

/// Hands the heap's free memory back to the kernel (glibc on Linux; a no-op elsewhere).
/// [`tune_cpu_runtime`] keeps freed buffers for reuse, which is right for the buffers of
/// a step but not for a model's load, which frees a copy of the weights once (the
/// decoder's projections, rewritten transposed): called after loading a model.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether the fused kernels may run on these tensors: CPU, f32, and not switched off.
fn fused(tensors: &[&Tensor]) -> bool {
    static COMPOSED: OnceLock<bool> = OnceLock::new();
    let forced = *COMPOSED.get_or_init(|| std::env::var("ADAPTERS_COMPOSED_OPS").is_ok_and(|v| v == "1"));
    !forced && tensors.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// The f32 values of contiguous CPU storage.
fn slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = storage else { return Err(Error::Msg(format!("{op}: expects f32"))) };
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| Error::Msg(format!("{op}: expects a contiguous input")))?;
    Ok(&v[start..end])
}

/// Runs `f` on the f32 values of CPU tensors (each made contiguous first), all at once.
fn with_values<const N: usize, R>(tensors: [&Tensor; N], op: &str, f: impl FnOnce([&[f32]; N]) -> R) -> Result<R> {
    let owned = tensors.iter().map(|t| t.contiguous()).collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut values = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else { return Err(Error::Msg(format!("{op}: expects CPU tensors"))) };
        values.push(slice(cpu, layout, op)?);
    }
    Ok(f(values.try_into().unwrap_or_else(|_| unreachable!("one slice per tensor"))))
}

/// What debug builds fill fresh output buffers with (a NaN no arithmetic produces), so
/// that [`written`] finds any element a kernel left unwritten.
#[cfg(debug_assertions)]
const UNWRITTEN: u32 = 0x7fa5_5a5a;

/// A buffer for `len` values that a kernel is about to write in full through references.
/// Zeroed, so no uninitialised memory can reach safe code even if a kernel missed an
/// element (about 2.6% of a MiniLM forward at batch 32 x 128, measured interleaved against
/// leaving them uninitialised; the linear layers' outputs, the largest, use
/// [`uninit_buffer`]); debug builds fill it with a marker NaN instead, which [`written`]
/// looks for.
fn output_buffer(len: usize) -> Vec<f32> {
    #[cfg(debug_assertions)]
    return vec![f32::from_bits(UNWRITTEN); len];
    #[cfg(not(debug_assertions))]
    vec![0.0; len]
}

/// A buffer for `len` values that a kernel writes in full through raw pointers (a product
/// that overwrites its output, stores of computed values) before [`assume_written`] turns
/// it into values: nothing reads it or makes a reference to its values before then, so it
/// need not be zeroed (zeroing the outputs of the linear layers costs ~10% of a MiniLM
/// forward, measured). Debug builds fill it with the marker [`written`] looks for.
fn uninit_buffer(len: usize) -> Vec<MaybeUninit<f32>> {
    #[cfg(debug_assertions)]
    return vec![MaybeUninit::new(f32::from_bits(UNWRITTEN)); len];
    #[cfg(not(debug_assertions))]
    {
        let mut v = Vec::with_capacity(len);
        // SAFETY: MaybeUninit needs no initialisation; capacity is len.
        unsafe { v.set_len(len) };
        v
    }
}

/// The values of a buffer from [`uninit_buffer`], checked by [`written`] in debug builds.
///
/// # Safety
/// Every element of `buffer` has been written.
unsafe fn assume_written(buffer: Vec<MaybeUninit<f32>>, op: &str) -> Vec<f32> {
    let mut buffer = std::mem::ManuallyDrop::new(buffer);
    let (ptr, len, capacity) = (buffer.as_mut_ptr().cast::<f32>(), buffer.len(), buffer.capacity());
    // SAFETY: MaybeUninit<f32> has f32's layout, and the caller promises every element is
    // initialised; the allocation moves to the new Vec whole.
    written(unsafe { Vec::from_raw_parts(ptr, len, capacity) }, op)
}

/// `buffer`, the output of `op`, after a debug build has checked that every element was
/// written (none holds the marker [`output_buffer`] filled it with).
fn written(buffer: Vec<f32>, op: &str) -> Vec<f32> {
    #[cfg(debug_assertions)]
    if let Some(i) = buffer.iter().position(|v| v.to_bits() == UNWRITTEN) {
        panic!("{op}: output element {i} of {} was never written", buffer.len());
    }
    let _ = op;
    buffer
}

/// A raw pointer that parallel tasks share, each writing only its own disjoint part.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: tasks write disjoint index ranges (checked by each kernel's indexing).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Matrix views for [`gemm`]: pointer, row stride, column stride (in elements).
#[derive(Clone, Copy)]
struct Mat(*const f32, isize, isize);

/// `dst = scale * lhs · rhs` (`accumulate`: `dst += ...`), `m x k` times `k x n`, on the
/// calling thread or split over `threads`.
///
/// # Safety
/// The views must stay inside their buffers for the given sizes, and `dst` must not alias.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: SharedMut,
    dst_rs: isize,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    accumulate: bool,
    threads: usize,
) {
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.get(),
            1,
            dst_rs,
            accumulate,
            lhs.0,
            lhs.2,
            lhs.1,
            rhs.0,
            rhs.2,
            rhs.1,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
mod tests;
