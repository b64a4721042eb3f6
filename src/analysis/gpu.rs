//! The all-pairs genuine / impostor histogram as a WGSL compute shader
//! (`shaders/pair_histogram.wgsl`) run through wgpu (the version eframe re-exports).
//!
//! The shader scores 64 × 64 tiles of the upper triangle in workgroup memory and bins
//! every pair `i < j` with atomic counters, never storing the score matrix. Its bin
//! convention is the CPU one ([`super::histogram::bin_index`]); dot products are summed
//! sequentially in f32 on the GPU while the CPU path uses gemm's blocked order, so a
//! score within an ulp or so of a bin edge can land in the neighbouring bin.
//!
//! **Tolerance.** Both paths count the same pairs (totals and the genuine/impostor split
//! are identical). Per bin, the counts may differ by edge cases only: at most
//! [`TOLERANCE_PER_MILLION`] moved pairs per million pairs (measured: about 0.3 per
//! million on 5,000 × 512 random unit vectors, see the tests).
//!
//! Adapter choice: the best compute-capable adapter of the primary backends (discrete >
//! integrated > virtual > other > CPU), so a machine without a GPU uses the software
//! Vulkan driver (lavapipe). `IDIFF_WGPU_ADAPTER=<substring>` picks an adapter by name.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake};

use anyhow::{anyhow, bail, Result};
use eframe::wgpu;

use super::histogram::PairHistogram;

/// The WGSL source, compiled into the binary.
pub const SHADER: &str = include_str!("../../shaders/pair_histogram.wgsl");

/// Rows and columns of one workgroup tile (must match the shader's `TILE`).
pub const GPU_TILE: usize = 64;

/// Largest bin count the shader's workgroup histogram holds (`MAX_BINS`).
pub const MAX_GPU_BINS: usize = 512;

/// Documented bound on the pairs binned differently from the CPU path, per million.
pub const TOLERANCE_PER_MILLION: f64 = 5.0;

/// Workgroup memory the shader declares (three 1024-word arrays).
const WORKGROUP_BYTES: u32 = 3 * 1024 * 4;

/// A wgpu device with the histogram pipeline compiled.
pub struct GpuHistogram {
    device: wgpu::Device,
    queue: wgpu::Queue,
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    errors: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for GpuHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuHistogram")
            .field("adapter", &self.adapter_name())
            .finish()
    }
}

/// Blocks the current thread on a future (wgpu's native futures resolve promptly).
fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 4,
        wgpu::DeviceType::IntegratedGpu => 3,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 1,
        wgpu::DeviceType::Cpu => 0,
    }
}

fn suitable(a: &wgpu::Adapter) -> bool {
    let l = a.limits();
    a.get_downlevel_capabilities()
        .flags
        .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
        && l.max_compute_workgroup_storage_size >= WORKGROUP_BYTES
        && l.max_compute_invocations_per_workgroup >= 256
        && l.max_storage_buffers_per_shader_stage >= 4
}

fn new_instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::PRIMARY,
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    })
}

fn describe(info: &wgpu::AdapterInfo) -> String {
    format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type)
}

impl GpuHistogram {
    /// Picks an adapter (see the module docs), creates a device and compiles the shader.
    ///
    /// # Errors
    /// When no compute-capable adapter exists or the device cannot be created.
    pub fn new() -> Result<Self> {
        let instance = new_instance();
        let mut adapters: Vec<wgpu::Adapter> =
            block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY))
                .into_iter()
                .filter(suitable)
                .collect();
        if let Ok(want) = std::env::var("IDIFF_WGPU_ADAPTER") {
            let want = want.to_lowercase();
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(&want));
        }
        adapters.sort_by_key(|a| std::cmp::Reverse(rank(a.get_info().device_type)));
        let adapter = adapters.into_iter().next().ok_or_else(|| {
            anyhow!(
                "no compute-capable wgpu adapter found (install a Vulkan driver, e.g. \
                 mesa-vulkan-drivers for the lavapipe software adapter)"
            )
        })?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("idiff pair histogram"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| anyhow!("cannot open wgpu device {}: {e}", describe(&info)))?;
        let errors = Arc::new(Mutex::new(Vec::new()));
        {
            let errors = errors.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                if let Ok(mut v) = errors.lock() {
                    v.push(e.to_string());
                }
            }));
        }
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("pair_histogram.wgsl"),
            source: wgpu::ShaderSource::Wgsl(SHADER.into()),
        });
        let entry = |binding: u32, ty: wgpu::BufferBindingType| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let read = wgpu::BufferBindingType::Storage { read_only: true };
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("pair histogram bindings"),
            entries: &[
                entry(0, wgpu::BufferBindingType::Uniform),
                entry(1, read),
                entry(2, read),
                entry(3, read),
                entry(4, wgpu::BufferBindingType::Storage { read_only: false }),
            ],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("pair histogram"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("pair histogram"),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            cache: None,
        });
        if let Some(e) = block_on(scope.pop()) {
            bail!("pair_histogram.wgsl failed on {}: {e}", describe(&info));
        }
        Ok(Self {
            device,
            queue,
            pipeline,
            layout,
            info,
            limits,
            errors,
        })
    }

    /// `name (backend, device type)` of the adapter in use.
    pub fn adapter_name(&self) -> String {
        describe(&self.info)
    }

    /// True when the adapter is a CPU (software) implementation such as lavapipe.
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Histogram of every pair `i < j` of `n × dim` embeddings (expected L2-normalised),
    /// genuine when the labels match; same layout and bin convention as
    /// [`super::histogram::all_pairs_histogram`].
    ///
    /// # Errors
    /// On inconsistent shapes, non-finite values, `bins` outside `1..=512`, data larger
    /// than the adapter's buffer limits, or a device failure.
    pub fn histogram(
        &self,
        emb: &[f32],
        dim: usize,
        labels: &[u32],
        bins: usize,
    ) -> Result<PairHistogram> {
        let n = labels.len();
        if dim == 0 || emb.len() != n * dim {
            bail!(
                "{} embedding values do not make {n} rows of width {dim}",
                emb.len()
            );
        }
        if !(1..=MAX_GPU_BINS).contains(&bins) {
            bail!("the GPU histogram supports 1..={MAX_GPU_BINS} bins, got {bins}");
        }
        if let Some(i) = emb.iter().position(|v| !v.is_finite()) {
            bail!("embedding value #{i} (row {}) is not finite", i / dim);
        }
        let mut out = PairHistogram::new(bins);
        if n < 2 {
            return Ok(out);
        }
        let emb_bytes = (emb.len() * 4) as u64;
        let cap = self
            .limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size);
        if emb_bytes > cap || n > u32::MAX as usize / dim {
            bail!(
                "{n} x {dim} embeddings need {emb_bytes} bytes; {} allows {cap} per buffer",
                self.adapter_name()
            );
        }
        let tiles = n.div_ceil(GPU_TILE) as u32;
        let pairs: Vec<u32> = (0..tiles)
            .flat_map(|a| (a..tiles).flat_map(move |b| [a, b]))
            .collect();
        if pairs.len() as u64 * 4 > cap {
            bail!(
                "{n} embeddings need too many tiles for {}",
                self.adapter_name()
            );
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let storage = |label: &str, data: &[u8]| {
            let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: (data.len() as u64).max(4).next_multiple_of(4),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            self.queue.write_buffer(&buf, 0, data);
            buf
        };
        let emb_buf = storage("embeddings", bytemuck_f32(emb).as_slice());
        let label_buf = storage("labels", &u32_bytes(labels));
        let tile_buf = storage("tile pairs", &u32_bytes(&pairs));
        let count_bytes = (2 * bins * 4) as u64;
        let counts = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("counts"),
            size: count_bytes,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let readback = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("counts readback"),
            size: count_bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let params = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: 32,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("pair histogram"),
            layout: &self.layout,
            entries: &[
                bind_entry(0, &params),
                bind_entry(1, &emb_buf),
                bind_entry(2, &label_buf),
                bind_entry(3, &tile_buf),
                bind_entry(4, &counts),
            ],
        });
        if let Some(e) = block_on(scope.pop()) {
            bail!("GPU histogram setup failed on {}: {e}", self.adapter_name());
        }
        // At most 65,535 tiles × 4,096 pairs per pass: the u32 counters cannot overflow.
        let per_pass = self
            .limits
            .max_compute_workgroups_per_dimension
            .clamp(1, 65_535);
        let total_tiles = (pairs.len() / 2) as u32;
        let mut offset = 0u32;
        while offset < total_tiles {
            let count = per_pass.min(total_tiles - offset);
            let p = Params {
                n: n as u32,
                dim: dim as u32,
                bins: bins as u32,
                tile_offset: offset,
                half_bins: bins as f32 * 0.5,
            };
            self.queue.write_buffer(&params, 0, &p.bytes());
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("pair histogram pass"),
                });
            enc.clear_buffer(&counts, 0, None);
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("pair histogram"),
                    timestamp_writes: None,
                });
                pass.set_pipeline(&self.pipeline);
                pass.set_bind_group(0, &bind, &[]);
                pass.dispatch_workgroups(count, 1, 1);
            }
            enc.copy_buffer_to_buffer(&counts, 0, &readback, 0, count_bytes);
            self.queue.submit([enc.finish()]);
            let pass_counts = self.read_counts(&readback)?;
            let (imp, gen) = pass_counts.split_at(bins);
            out.impostor
                .iter_mut()
                .zip(imp)
                .for_each(|(o, &c)| *o += u64::from(c));
            out.genuine
                .iter_mut()
                .zip(gen)
                .for_each(|(o, &c)| *o += u64::from(c));
            offset += count;
        }
        self.check_errors()?;
        let expected = (n as u64) * (n as u64 - 1) / 2;
        if out.total() != expected {
            bail!(
                "GPU histogram on {} counted {} pairs, expected {expected}",
                self.adapter_name(),
                out.total()
            );
        }
        Ok(out)
    }

    fn read_counts(&self, readback: &wgpu::Buffer) -> Result<Vec<u32>> {
        let (tx, rx) = std::sync::mpsc::channel();
        readback.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| anyhow!("GPU histogram on {}: {e}", self.adapter_name()))?;
        rx.recv()
            .map_err(|_| anyhow!("GPU readback was dropped"))?
            .map_err(|e| anyhow!("GPU readback failed: {e}"))?;
        let counts: Vec<u32> = {
            let view = readback
                .get_mapped_range(..)
                .map_err(|e| anyhow!("GPU readback failed: {e}"))?;
            view.chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        };
        readback.unmap();
        self.check_errors()?;
        Ok(counts)
    }

    fn check_errors(&self) -> Result<()> {
        let errors = self
            .errors
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        match errors.first() {
            Some(e) => bail!(
                "GPU histogram on {}: {}",
                self.adapter_name(),
                e.lines().next().unwrap_or("device error")
            ),
            None => Ok(()),
        }
    }
}

/// The shader's `Params` uniform (32 bytes).
struct Params {
    n: u32,
    dim: u32,
    bins: u32,
    tile_offset: u32,
    half_bins: f32,
}

impl Params {
    fn bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&self.n.to_le_bytes());
        b[4..8].copy_from_slice(&self.dim.to_le_bytes());
        b[8..12].copy_from_slice(&self.bins.to_le_bytes());
        b[12..16].copy_from_slice(&self.tile_offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.half_bins.to_le_bytes());
        b
    }
}

fn bind_entry(binding: u32, buffer: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: buffer.as_entire_binding(),
    }
}

fn bytemuck_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::histogram::all_pairs_histogram;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    /// The GPU, or `None` with a skip note (a failure under `CI=true`).
    pub(crate) fn gpu_or_skip() -> Option<GpuHistogram> {
        match GpuHistogram::new() {
            Ok(g) => Some(g),
            Err(e) => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("CI=true requires a wgpu adapter: {e}");
                }
                eprintln!("skipping GPU histogram test: {e}");
                None
            }
        }
    }

    fn random_unit(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut v: Vec<f32> = (0..n * dim).map(|_| rng.random_range(-1.0..1.0)).collect();
        crate::analysis::embed::normalise_rows(&mut v, dim);
        v
    }

    /// Sum over bins of |cpu − gpu|, genuine and impostor.
    fn moved(a: &PairHistogram, b: &PairHistogram) -> u64 {
        a.genuine
            .iter()
            .chain(&a.impostor)
            .zip(b.genuine.iter().chain(&b.impostor))
            .map(|(x, y)| x.abs_diff(*y))
            .sum()
    }

    #[test]
    fn gpu_histogram_matches_cpu_on_5000_x_512() {
        let Some(gpu) = gpu_or_skip() else { return };
        let (n, dim) = (5000, 512);
        let emb = random_unit(n, dim, 42);
        // 250 identities of 20: genuine pairs in every tile class.
        let labels: Vec<u32> = (0..n as u32).map(|i| i / 20).collect();
        let cpu = all_pairs_histogram(&emb, dim, &labels, 100).unwrap();
        let t = std::time::Instant::now();
        let got = gpu.histogram(&emb, dim, &labels, 100).unwrap();
        eprintln!(
            "GPU histogram {n}x{dim} on {}: {:.2} s",
            gpu.adapter_name(),
            t.elapsed().as_secs_f64()
        );
        assert_eq!(got.total(), cpu.total());
        assert_eq!(
            got.genuine.iter().sum::<u64>(),
            cpu.genuine.iter().sum::<u64>()
        );
        let pairs = cpu.total() as f64;
        let m = moved(&got, &cpu);
        eprintln!(
            "bins differing: {m} count moves over {pairs} pairs ({:.3} per million)",
            m as f64 / pairs * 1e6
        );
        assert!(
            (m as f64) <= TOLERANCE_PER_MILLION * pairs / 1e6,
            "{m} moved counts"
        );
    }

    #[test]
    fn gpu_histogram_exact_on_exactly_representable_data() {
        let Some(gpu) = gpu_or_skip() else { return };
        // Entries in {-1/8, 0, 1/8} with dim 64: every partial sum is exact, so both
        // paths must agree bin for bin, including partial tiles (n not a multiple of 64).
        let (n, dim) = (333, 64);
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let emb: Vec<f32> = (0..n * dim)
            .map(|_| [-0.125f32, 0.0, 0.125][rng.random_range(0..3)])
            .collect();
        let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0..30)).collect();
        for bins in [1, 7, 100, 512] {
            let cpu = all_pairs_histogram(&emb, dim, &labels, bins).unwrap();
            assert_eq!(
                gpu.histogram(&emb, dim, &labels, bins).unwrap(),
                cpu,
                "{bins} bins"
            );
        }
        // Odd widths (not a multiple of the 16-wide k chunk) and tiny sets.
        let emb3 = [1.0f32, 0.0, 0.0, 0.6, 0.8, 0.0, 0.0, 0.0, 1.0];
        let h = gpu.histogram(&emb3, 3, &[0, 0, 1], 10).unwrap();
        assert_eq!(h, all_pairs_histogram(&emb3, 3, &[0u32, 0, 1], 10).unwrap());
        assert_eq!(gpu.histogram(&emb3[..3], 3, &[0], 10).unwrap().total(), 0);
        assert!(gpu.histogram(&emb3, 3, &[0, 0, 1], 513).is_err());
        assert!(gpu.histogram(&emb3, 4, &[0, 0, 1], 10).is_err());
        let mut bad = emb3;
        bad[4] = f32::NAN;
        assert!(gpu.histogram(&bad, 3, &[0, 0, 1], 10).is_err());
    }
}
