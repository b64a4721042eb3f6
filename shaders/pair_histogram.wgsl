// All-pairs genuine / impostor cosine-similarity histogram of L2-normalised embeddings.
//
// Each workgroup scores one 64 x 64 tile of the upper triangle of the N x N similarity
// matrix (tile pair `tiles[tile_offset + workgroup_id.x]`, row tile <= column tile). The
// rows and columns of the tile are staged through workgroup memory KC dimensions at a
// time; each of the 16 x 16 invocations accumulates a 4 x 4 block of dot products in f32
// registers (sequential order over the dimensions). Every pair i < j of the tile is then
// binned into a workgroup-local atomic histogram, which is added to the global one at
// the end, so the score matrix is never stored.
//
// Bin convention (identical to analysis::histogram::bin_index, evaluated in f32):
//   bin = clamp(floor((s + 1) * (bins / 2)), 0, bins - 1)
// Counts layout: [impostor bins | genuine bins].

struct Params {
    n: u32,
    dim: u32,
    bins: u32,
    tile_offset: u32,
    half_bins: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

const TILE: u32 = 64u;
const KC: u32 = 16u;
const THREADS: u32 = 256u;
const MAX_BINS: u32 = 512u;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> emb: array<f32>;
@group(0) @binding(2) var<storage, read> labels: array<u32>;
@group(0) @binding(3) var<storage, read> tiles: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read_write> counts: array<atomic<u32>>;

// k-major staging: a_tile[k * TILE + r] holds emb[row0 + r][k0 + k].
var<workgroup> a_tile: array<f32, 1024>;
var<workgroup> b_tile: array<f32, 1024>;
var<workgroup> local_counts: array<atomic<u32>, 1024>;

fn load(row: u32, k: u32) -> f32 {
    if (row < params.n && k < params.dim) {
        return emb[row * params.dim + k];
    }
    return 0.0;
}

fn bin_of(s: f32) -> u32 {
    let t = (s + 1.0) * params.half_bins;
    // max/min clamp (and send NaN to 0 on IEEE max); inputs are finite in practice.
    let c = min(max(floor(t), 0.0), f32(params.bins - 1u));
    return u32(c);
}

fn add_pair(r: u32, c: u32, s: f32) {
    if (r < c && c < params.n) {
        var k = bin_of(s);
        if (labels[r] == labels[c]) {
            k = k + params.bins;
        }
        atomicAdd(&local_counts[k], 1u);
    }
}

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let tile = tiles[params.tile_offset + wid.x];
    let row0 = tile.x * TILE;
    let col0 = tile.y * TILE;
    let tx = lid.x;
    let ty = lid.y;

    for (var i = li; i < 2u * MAX_BINS; i = i + THREADS) {
        atomicStore(&local_counts[i], 0u);
    }

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < params.dim; k0 = k0 + KC) {
        // 1024 values per tile, 4 per invocation; consecutive invocations read
        // consecutive dimensions of one row.
        for (var e = li; e < TILE * KC; e = e + THREADS) {
            let r = e / KC;
            let k = e % KC;
            a_tile[k * TILE + r] = load(row0 + r, k0 + k);
            b_tile[k * TILE + r] = load(col0 + r, k0 + k);
        }
        workgroupBarrier();
        for (var k = 0u; k < KC; k = k + 1u) {
            let base = k * TILE;
            let b = vec4<f32>(
                b_tile[base + tx],
                b_tile[base + tx + 16u],
                b_tile[base + tx + 32u],
                b_tile[base + tx + 48u],
            );
            acc0 = acc0 + a_tile[base + ty] * b;
            acc1 = acc1 + a_tile[base + ty + 16u] * b;
            acc2 = acc2 + a_tile[base + ty + 32u] * b;
            acc3 = acc3 + a_tile[base + ty + 48u] * b;
        }
        workgroupBarrier();
    }

    let accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i = i + 1u) {
        let r = row0 + ty + 16u * i;
        let a = accs[i];
        add_pair(r, col0 + tx, a.x);
        add_pair(r, col0 + tx + 16u, a.y);
        add_pair(r, col0 + tx + 32u, a.z);
        add_pair(r, col0 + tx + 48u, a.w);
    }
    workgroupBarrier();

    for (var i = li; i < 2u * params.bins; i = i + THREADS) {
        let v = atomicLoad(&local_counts[i]);
        if (v != 0u) {
            atomicAdd(&counts[i], v);
        }
    }
}
