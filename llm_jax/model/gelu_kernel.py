"""The MLP's down projection fed its pre-activation, gelu(h) @ W, whose backward pass computes
dh = (dY @ W^T) * gelu'(h) in one Mosaic GPU kernel on Hopper GPUs (model.gelu_kernel).

XLA runs that gradient as a cuBLAS GEMM writing g = dY @ W^T in bf16, then a fusion reading g and h and
writing dh: 11.1 ms per 12 layers of gpt_small's 64 x 1,024-token pass on an H200, of which the fusion is
5.8 (docs/performance.md, "Round six"). Here the GEMM's float32 accumulator is multiplied by gelu'(h) before
its only write: g never reaches memory. The kernel is persistent (one CUDA block per SM walks the output
tiles), fed by TMA, multiplied by wgmma: two compute warpgroups own a TM x TN tile each, side by side along
F, while a memory warpgroup streams K slices of dY and W^T STEPS deep. Each compute warpgroup asks for its
h tile (as 64 x 64 pieces) when its tile starts, so that load overlaps the K loop, then overwrites the
pieces with the result and stores them.

Shapes: M rows (tokens), D model width (the GEMM's K), F MLP width. The kernel needs bf16, M divisible by
TM, F by 2 TN, D by TK (gpt_small's shapes are); anything else, and every non-Hopper platform, takes XLA's
path (same function, g rounded to bf16 first). The forward pass is XLA's either way.

With biases, the up projection (UpProjection: nn.Dense's parameters) hands its bias to gelu_dot unadded,
so the bias gradient, dh's column sums, comes from the same backward pass: the kernel can write them
per row tile from its float32 epilogue (col_sums) instead of XLA reading all of dh again for them, which
cost the biased preset most of the kernel's gain ("Round seven"). KERNEL_BIAS_SUMS switches that on once a
GPU run has checked it; the CPU tests lower the kernel for CUDA in both forms.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from llm_jax.model.activations import (
  gelu_tanh,
  gelu_tanh_grad,
  gelu_tanh_slope,
  gelu_tanh_slope_by_sigmoid,
  tanh_by_exp2,
)
from llm_jax.model.partitioning import current_mesh, gathering_dot


@dataclasses.dataclass(frozen=True)
class Tiles:
  """The kernel's settings. m, n: a compute warpgroup's output tile (a block's is m x 2n); k: the K slice
  per pipeline step; steps: slices in flight; width, minor: the walk over output tiles (planar_snake:
  bands `width` tiles wide along dimension `minor`, 0 = M); tanh: how the epilogue computes gelu'(h)'s tanh.
  Measured per 12 layers of gpt_small on one H200 with bench/dgelu_probe.py (its slope rows: gelu'(h) in
  bf16 against float64's; docs/performance.md, "Round eight"):
    "e"  the compiler's exact float32 tanh: 9.1-9.3 ms; largest difference 1.9e-6.
    "a"  tanh.approx.f32: 8.1 ms, but off by up to 7.8e-3 with a systematic mean (-9.2e-6), which moved
         shakespeare_char's best loss by +0.0045 over eight seeds ("Round seven"). Probe only.
    "p"  activations.tanh_by_exp2 with ex2.approx.ftz.f32 and a division: 8.7 ms; up to 1.2e-4.
    "q"  the same with the compiler's exp2: 9.1 ms.
    "r"  ex2.approx and the division as rsqrt.approx.f32 squared, two fast instructions: 8.5-8.7 ms; up to
         7.6e-6 (only where gelu' is below ~1e-3: float32's cancellation), mean -7e-8.
    "s"  no tanh: gelu' written with sigmoid(2u) (activations.gelu_tanh_slope_by_sigmoid), the same two
         fast instructions and about half the other arithmetic (the epilogue is ALU-bound): 8.1 ms against
         "r"'s 8.5 in one call; nothing cancels, so 4 of 25M slopes differ from float64's in bf16 (XLA's
         own: 2.2%). The default.
  loop: how the K loop meets its neighbours (LOOP). "w" waits for each step's wgmma before the next is
  issued and starts each output tile's pipeline afresh, as jax's own Hopper GEMM does (6.3 ms alone at
  these shapes against cuBLAS's 5.3); "d" leaves one wgmma group in flight across steps (the slices
  released a step later: CUTLASS's main loop); "c" chains the tiles' pipelines (Pallas's pipeline of
  pipelines), so the memory warpgroup fetches the next tile's first slices during this tile's epilogue
  instead of after it. Both measured slower than "w" on one H200 ("s": 8.40 and 8.34 ms against 8.10).
  """

  m: int = 128
  n: int = 128
  k: int = 64
  steps: int = 3
  width: int = 16
  minor: int = 0
  tanh: str = "s"
  loop: str = "w"

  @classmethod
  def parse(cls, text: str) -> Tiles:
    """MxNxKxSTEPS[xWIDTH[xMINOR[xTANH[xLOOP]]]] (MINOR m or n; TANH e, a, p, q, r or s and LOOP w, d or c
    as the class says)."""
    p = text.split("x")
    extra = dict(zip(("width", "minor", "tanh", "loop"), p[4:], strict=False))
    if extra.get("tanh", "s") not in _TANH:
      raise ValueError(f"Tiles.parse({text!r}): TANH must be one of {', '.join(_TANH)}")
    if extra.get("loop", "w") not in ("w", "d", "c"):
      raise ValueError(f"Tiles.parse({text!r}): LOOP must be one of w, d, c")
    return cls(
      *(int(v) for v in p[:4]),
      width=int(extra.get("width", 16)),
      minor=0 if extra.get("minor", "m") == "m" else 1,
      tanh=extra.get("tanh", "s"),
      loop=extra.get("loop", "w"),
    )

  @property
  def approx_math(self) -> bool:
    """Mosaic GPU's approx_math (its .approx instructions): tanh ("a"), exp2 ("p"), exp2, rsqrt ("r", "s")."""
    return self.tanh in ("a", "p", "r", "s")

  def slope(self, h):
    """gelu'(h) in float32, its tanh as `tanh` says."""
    if self.tanh in ("e", "a"):
      return gelu_tanh_slope(h)
    if self.tanh == "s":
      return gelu_tanh_slope_by_sigmoid(h)
    return gelu_tanh_slope(h, functools.partial(tanh_by_exp2, rsqrt_squared=self.tanh == "r"))


_TANH = ("e", "a", "p", "q", "r", "s")
TILES = Tiles()  # the fastest float32-accurate settings for gpt_small on one H200 (bench/dgelu_probe.py)
_PIECE = 64  # epilogue pieces: 64 bf16 = one 128-byte swizzled row


def on_hopper(platform: str | None = None) -> bool:
  """Whether the default devices are Hopper GPUs (compute capability 9.x: wgmma and TMA)."""
  if (platform or jax.default_backend()) != "gpu":
    return False
  return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


def _num_sms() -> int:
  """The GPU's SM count: one persistent block each."""
  return jax.devices()[0].core_count


def fits(m: int, d: int, f: int, dtype, tiles: Tiles | None = None) -> bool:
  """Whether the kernel's tiles divide dh's [m, f] and the contraction d (and the dtype is bf16)."""
  tiles = tiles or TILES
  return dtype == jnp.bfloat16 and m % tiles.m == 0 and f % (2 * tiles.n) == 0 and d % tiles.k == 0


def mosaic_dgelu_matmul(dy_MD, w_FD, h_MF, tiles: Tiles | None = None, col_sums: bool = False):
  """(dY @ W^T) * gelu'(h) -> [M, F] bf16, one Mosaic GPU kernel (Hopper; shapes as `fits` says).

  `col_sums`: also the result's column sums per row tile, float32 [M / TM, F] (before the bf16 rounding),
  returned second: the up projection's bias gradient once summed over the row tiles, without reading dh
  again (KERNEL_BIAS_SUMS)."""
  import jax.experimental.pallas.mosaic_gpu as mg  # noqa: PLC0415 -- needs a CUDA jaxlib; CPU runs never import it

  tiles = tiles or TILES
  if not fits(dy_MD.shape[0], dy_MD.shape[1], w_FD.shape[0], h_MF.dtype, tiles):
    raise ValueError(f"mosaic_dgelu_matmul: {tiles} do not divide dY {dy_MD.shape} @ W^T {w_FD.shape[::-1]}")
  tm, tn, tk = tiles.m, tiles.n, tiles.k
  (m, d), f = dy_MD.shape, w_FD.shape[0]
  m_tiles, f_tiles, k_steps = m // tm, f // (2 * tn), d // tk
  pieces = [(i, j) for i in range(tm // _PIECE) for j in range(tn // _PIECE)]
  layout = (mg.TilingTransform((8, _PIECE)), mg.SwizzleTransform(128))
  wt_DF = w_FD.T

  delay = 1 if tiles.loop == "d" else 0
  # chained pipelines need every block to walk at least two tiles (a first and a last) and whole rounds
  # of `steps` slices per tile
  chained = tiles.loop == "c" and m_tiles * f_tiles >= 2 * _num_sms() and k_steps % tiles.steps == 0

  def body(dy_gmem, wt_gmem, h_gmem, out_gmem, *sums_gmem):
    def pipeline(step_body, context, state=None):
      return mg.emit_pipeline_warp_specialized(
        step_body,
        grid=(k_steps,),
        memory_registers=40,
        in_specs=[
          mg.BlockSpec(
            (tm, tk), lambda s: (0, s), transforms=layout, memory_space=mg.SMEM, delay_release=delay
          ),
          mg.BlockSpec(
            (tk, 2 * tn), lambda s: (s, 0), transforms=layout, memory_space=mg.SMEM, delay_release=delay
          ),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=tiles.steps,
        compute_context=context,
        pipeline_state=state,
      )

    def nothing(*_, **__):
      return None

    @functools.partial(
      pl.run_scoped,
      allocs=pipeline(nothing, nothing).get_allocations(dy_gmem, wt_gmem),
      h_smem=mg.SMEM((2, len(pieces), _PIECE, _PIECE), jnp.bfloat16, transforms=layout),
      h_ready=mg.Barrier(num_barriers=2 * len(pieces)),
      sums_smem=mg.SMEM((2, 1, tn if col_sums else 1), jnp.float32),
      collective_axes="wg",
    )
    def scope(allocs, h_smem, h_ready, sums_smem):
      wg = lax.axis_index("wg")

      @mg.nd_loop((m_tiles * f_tiles,), collective_axes="sm")
      def tile_loop(info):
        (lin,) = info.index
        mi, fi = mg.planar_snake(lin, (m_tiles, f_tiles), tiles.minor, tiles.width)
        rows, cols = pl.ds(mi * tm, tm), pl.ds(fi * 2 * tn + wg * tn, tn)

        def piece(ref, i, j):
          return ref.at[rows, cols].at[pl.ds(i * _PIECE, _PIECE), pl.ds(j * _PIECE, _PIECE)]

        def context(run_pipeline):
          @functools.partial(pl.run_scoped, acc_ref=mg.ACC((tm, tn), jnp.float32))
          def acc_scope(acc_ref):
            mg.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's stores have left h_smem
            for p, (i, j) in enumerate(pieces):
              mg.copy_gmem_to_smem(piece(h_gmem, i, j), h_smem.at[wg, p], h_ready.at[wg * len(pieces) + p])
            run_pipeline(acc_ref)
            mg.wgmma_wait(0)  # with loop "d", the last step's wgmma may still run
            acc = acc_ref[...]
            sums = {}
            for p, (i, j) in enumerate(pieces):
              mg.barrier_wait(h_ready.at[wg * len(pieces) + p])
              slope = tiles.slope(h_smem[wg, p].astype(jnp.float32))
              g = acc[i * _PIECE : (i + 1) * _PIECE, j * _PIECE : (j + 1) * _PIECE]
              dh = g * slope
              h_smem[wg, p] = dh.astype(jnp.bfloat16)
              mg.commit_smem()
              mg.copy_smem_to_gmem(h_smem.at[wg, p], piece(out_gmem, i, j))
              if col_sums:
                s = jnp.sum(dh, axis=0)
                sums[j] = sums[j] + s if j in sums else s
            if col_sums:
              for j, s in sums.items():
                sums_smem[wg, 0, pl.ds(j * _PIECE, _PIECE)] = s
              mg.commit_smem()
              mg.copy_smem_to_gmem(sums_smem.at[wg], sums_gmem[0].at[pl.ds(mi, 1), cols])

        def step(_, dy_smem, wt_smem, acc_ref):
          mg.wgmma(acc_ref, dy_smem, wt_smem.at[:, pl.ds(wg * tn, tn)])
          mg.wgmma_wait(delay)
          return acc_ref

        state = None
        if chained:  # this block's first tile starts the chain, its last one drains it
          first, last = info.local_index == 0, info.local_index == info.num_local_steps - 1
          stage = mg.PipelinePipeline
          state = jnp.where(first, int(stage.START), jnp.where(last, int(stage.STOP), int(stage.STEADY)))
        run = pipeline(step, context, state)
        run(dy_gmem.at[rows, :], wt_gmem.at[:, pl.ds(fi * 2 * tn, 2 * tn)], allocations=allocs)

    mg.wait_smem_to_gmem(0, wait_read_only=True)

  out_type = jax.ShapeDtypeStruct((m, f), jnp.bfloat16)
  if col_sums:
    out_type = (out_type, jax.ShapeDtypeStruct((m_tiles, f), jnp.float32))
  return mg.kernel(
    body,
    out_type=out_type,
    grid=(_num_sms(),),
    grid_names=("sm",),
    num_threads=3,
    thread_name="wg",
    compiler_params=mg.CompilerParams(
      lowering_semantics=mg.LoweringSemantics.Warpgroup, approx_math=tiles.approx_math
    ),
  )(dy_MD, wt_DF, h_MF)


def xla_dgelu_matmul(dy_MD, w_FD, h_MF):
  """(dY @ W^T) * gelu'(h) as XLA runs it: the GEMM's result in its inputs' dtype, then gelu_tanh's own
  backward pass."""
  return gelu_tanh_grad(h_MF, dy_MD @ w_FD.T)


KERNEL_BIAS_SUMS = False  # the up bias's gradient from the kernel's column sums: not yet run on a GPU
# (bench/dgelu_probe.py --bias checks it there); until then XLA sums dh for it, reading dh again


def _local_dgelu(dy_BLD, w_FD, h_BLF, kernel: bool, bias_grad: bool):
  """One device's rows: the kernel where asked and the local shapes fit, else XLA's path. Returns dh and,
  with `bias_grad`, its float32 column sums [F] (the up projection's bias gradient), else None."""
  d, f = w_FD.shape[1], w_FD.shape[0]
  dy_MD, h_MF = dy_BLD.reshape(-1, d), h_BLF.reshape(-1, f)
  use = kernel and fits(h_MF.shape[0], d, f, h_MF.dtype) and dy_MD.dtype == w_FD.dtype == h_MF.dtype
  if use and bias_grad and KERNEL_BIAS_SUMS:
    out_MF, sums_TF = mosaic_dgelu_matmul(dy_MD, w_FD, h_MF, col_sums=True)
    db_F = jnp.sum(sums_TF, axis=0)
  else:
    out_MF = (mosaic_dgelu_matmul if use else xla_dgelu_matmul)(dy_MD, w_FD, h_MF)
    db_F = jnp.sum(out_MF.astype(jnp.float32), axis=0) if bias_grad else None
  return out_MF.reshape(h_BLF.shape), db_F


def dgelu_matmul(dy_BLD, w_FD, h_BLF, kernel: bool, bias_grad: bool = False):
  """(dY @ W^T) * gelu'(h) on each device's rows of the current mesh (constraint_mesh), and with
  `bias_grad` its float32 column sums [F], else None.

  A custom kernel is opaque to XLA's partitioner, so it runs under shard_map: rows split as the `batch` and
  `length` logical axes are, F as `act_mlp` is (a tensor-parallel W's rows go with it), D whole; the column
  sums are summed over the row axes there.
  """
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return _local_dgelu(dy_BLD, w_FD, h_BLF, kernel, bias_grad)
  *rows, mlp = nn.logical_to_mesh_axes(("batch", "length", "act_mlp"))
  row_axes = tuple(n for a in rows if a is not None for n in ((a,) if isinstance(a, str) else a))

  def local(dy_BLD, w_FD, h_BLF):
    dh_BLF, db_F = _local_dgelu(dy_BLD, w_FD, h_BLF, kernel, bias_grad)
    if not bias_grad:
      return dh_BLF
    return dh_BLF, (lax.psum(db_F, row_axes) if row_axes else db_F)

  out = jax.shard_map(
    local,
    mesh=mesh,
    in_specs=(P(*rows, None), P(mlp, None), P(*rows, mlp)),
    out_specs=(P(*rows, mlp), P(mlp)) if bias_grad else P(*rows, mlp),
    check_vma=False,
  )(dy_BLD, w_FD, h_BLF)
  return out if bias_grad else (out, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gelu_dot(h_BLF, b_F, w_FD, kernel: bool):
  """gelu_tanh(h + b) @ W (b None: no bias); the gradients with respect to h and b from dgelu_matmul (the
  kernel when `kernel`)."""
  return gelu_tanh(h_BLF if b_F is None else h_BLF + b_F) @ w_FD


def _gelu_dot_fwd(h_BLF, b_F, w_FD, kernel):
  if b_F is not None:
    h_BLF = h_BLF + b_F
  a_BLF = gelu_tanh(h_BLF)
  return a_BLF @ w_FD, (h_BLF, a_BLF, w_FD, b_F)


def _gelu_dot_bwd(kernel, residuals, dy_BLD):
  h_BLF, a_BLF, w_FD, b_F = residuals  # b_F: only its dtype is used
  dh_BLF, db_F = dgelu_matmul(dy_BLD, w_FD, h_BLF, kernel, bias_grad=b_F is not None)
  dw_FD = jnp.einsum("blf,bld->fd", a_BLF, dy_BLD.astype(a_BLF.dtype))
  return dh_BLF, None if b_F is None else db_F.astype(b_F.dtype), dw_FD.astype(w_FD.dtype)


gelu_dot.defvjp(_gelu_dot_fwd, _gelu_dot_bwd)


class UpProjection(nn.Dense):
  """The up projection as gelu_dot takes it: nn.Dense's parameters (same names, shapes and initialisers),
  but x @ W and the bias come back unadded, so that the bias goes into gelu_dot and its gradient comes from
  the same backward pass as dh."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    return self.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision), bias


def gelu_dot_general(kernel_axes, kernel: bool, bias=None):
  """A dot_general for the down projection's flax Dense, fed the pre-activation h without the up
  projection's `bias` (UpProjection's two results): gelu_dot after the FSDP weight gather
  (llm_jax.model.partitioning.gathering_dot). Same parameters as a Dense fed gelu(h + bias)."""

  def product(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or lhs.ndim != 3:
      raise ValueError(f"gelu_dot_general: a [B, L, F] @ [F, D] product, got {dimension_numbers}")
    return gelu_dot(lhs, bias, rhs, kernel)

  return gathering_dot(kernel_axes, product=product)
