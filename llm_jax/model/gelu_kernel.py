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

With biases, XLA sums dh for the up bias's gradient (reading dh again). The kernel writing those sums from
its float32 epilogue was tried and measured slower than that, besides wrong on the H200 ("Round nine").
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
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
         fast instructions and about half the other arithmetic: 8.1 ms against "r"'s 8.5 in one call
         (less than halving an ALU-bound epilogue would give); it loses no precision to cancellation, so
         4 of 25M slopes differ from float64's in bf16 (XLA's own: 2.2%). The default.
  The K loop waits for each step's wgmma before the next is issued and starts each output tile's pipeline
  afresh, as jax's own Hopper GEMM does. Leaving one wgmma group in flight across steps (delay_release 1),
  and chaining the tiles' pipelines (Pallas's pipeline of pipelines), each measured slower on one H200
  (8.40 and 8.34 ms against 8.10 with "s"; docs/performance.md "Round nine"), and were taken out.
  Both compute warpgroups work on one m x 2n block, fed the same K slices, and run their epilogues
  together while the tensor cores wait. A ping-pong schedule (each warpgroup every other m x n tile, one
  ring of slices, one's epilogue during the other's K loop) timed the same at 4 slots (8.38 ms) and
  slower at 3 and 5 ("Round ten") and was taken out.
  """

  m: int = 128
  n: int = 128
  k: int = 64
  steps: int = 3
  width: int = 16
  minor: int = 0
  tanh: str = "s"

  @classmethod
  def parse(cls, text: str) -> Tiles:
    """MxNxKxSTEPS[xWIDTH[xMINOR[xTANH]]] (MINOR m or n; TANH e, a, p, q, r or s as the class says)."""
    p = text.split("x")
    if not 4 <= len(p) <= 7:
      raise ValueError(f"Tiles.parse({text!r}): expected MxNxKxSTEPS[xWIDTH[xMINOR[xTANH]]]")
    extra = dict(zip(("width", "minor", "tanh"), p[4:], strict=False))
    if extra.get("tanh", "s") not in _TANH:
      raise ValueError(f"Tiles.parse({text!r}): TANH must be one of {', '.join(_TANH)}")
    return cls(
      *(int(v) for v in p[:4]),
      width=int(extra.get("width", 16)),
      minor=0 if extra.get("minor", "m") == "m" else 1,
      tanh=extra.get("tanh", "s"),
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


def mosaic_dgelu_matmul(dy_MD, w_FD, h_MF, tiles: Tiles | None = None):
  """(dY @ W^T) * gelu'(h) -> [M, F] bf16, one Mosaic GPU kernel (Hopper; shapes as `fits` says)."""
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

  def fetch_h(h_gmem, rows, cols, h_smem, h_ready, wg):
    """Asks for this warpgroup's h tile, as pieces, once the last tile's stores have left h_smem."""
    mg.wait_smem_to_gmem(0, wait_read_only=True)
    for p, (i, j) in enumerate(pieces):
      src = h_gmem.at[rows, cols].at[pl.ds(i * _PIECE, _PIECE), pl.ds(j * _PIECE, _PIECE)]
      mg.copy_gmem_to_smem(src, h_smem.at[wg, p], h_ready.at[wg * len(pieces) + p])

  def epilogue(acc, out_gmem, rows, cols, h_smem, h_ready, wg):
    """dh = g * gelu'(h) piece by piece, written over h's piece in shared memory, then stored."""
    for p, (i, j) in enumerate(pieces):
      mg.barrier_wait(h_ready.at[wg * len(pieces) + p])
      slope = tiles.slope(h_smem[wg, p].astype(jnp.float32))
      g = acc[i * _PIECE : (i + 1) * _PIECE, j * _PIECE : (j + 1) * _PIECE]
      h_smem[wg, p] = (g * slope).astype(jnp.bfloat16)
      mg.commit_smem()
      dst = out_gmem.at[rows, cols].at[pl.ds(i * _PIECE, _PIECE), pl.ds(j * _PIECE, _PIECE)]
      mg.copy_smem_to_gmem(h_smem.at[wg, p], dst)

  def body(dy_gmem, wt_gmem, h_gmem, out_gmem):
    def pipeline(step_body, context):
      return mg.emit_pipeline_warp_specialized(
        step_body,
        grid=(k_steps,),
        memory_registers=40,
        in_specs=[
          mg.BlockSpec((tm, tk), lambda s: (0, s), transforms=layout, memory_space=mg.SMEM),
          mg.BlockSpec((tk, 2 * tn), lambda s: (s, 0), transforms=layout, memory_space=mg.SMEM),
        ],
        wg_axis="wg",
        num_compute_wgs=2,
        max_concurrent_steps=tiles.steps,
        compute_context=context,
      )

    def nothing(*_, **__):
      return None

    @functools.partial(
      pl.run_scoped,
      allocs=pipeline(nothing, nothing).get_allocations(dy_gmem, wt_gmem),
      h_smem=mg.SMEM((2, len(pieces), _PIECE, _PIECE), jnp.bfloat16, transforms=layout),
      h_ready=mg.Barrier(num_barriers=2 * len(pieces)),
      collective_axes="wg",
    )
    def scope(allocs, h_smem, h_ready):
      wg = lax.axis_index("wg")

      @mg.nd_loop((m_tiles * f_tiles,), collective_axes="sm")
      def tile_loop(info):
        (lin,) = info.index
        mi, fi = mg.planar_snake(lin, (m_tiles, f_tiles), tiles.minor, tiles.width)
        rows, cols = pl.ds(mi * tm, tm), pl.ds(fi * 2 * tn + wg * tn, tn)

        def context(run_pipeline):
          @functools.partial(pl.run_scoped, acc_ref=mg.ACC((tm, tn), jnp.float32))
          def acc_scope(acc_ref):
            fetch_h(h_gmem, rows, cols, h_smem, h_ready, wg)
            run_pipeline(acc_ref)
            epilogue(acc_ref[...], out_gmem, rows, cols, h_smem, h_ready, wg)

        def step(_, dy_smem, wt_smem, acc_ref):
          mg.wgmma(acc_ref, dy_smem, wt_smem.at[:, pl.ds(wg * tn, tn)])
          mg.wgmma_wait(0)
          return acc_ref

        run = pipeline(step, context)
        run(dy_gmem.at[rows, :], wt_gmem.at[:, pl.ds(fi * 2 * tn, 2 * tn)], allocations=allocs)

    mg.wait_smem_to_gmem(0, wait_read_only=True)

  return mg.kernel(
    body,
    out_type=jax.ShapeDtypeStruct((m, f), jnp.bfloat16),
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


def _local_dgelu(dy_BLD, w_FD, h_BLF, kernel: bool):
  """One device's rows: the kernel where asked and the local shapes fit, else XLA's path."""
  d, f = w_FD.shape[1], w_FD.shape[0]
  dy_MD, h_MF = dy_BLD.reshape(-1, d), h_BLF.reshape(-1, f)
  use = kernel and fits(h_MF.shape[0], d, f, h_MF.dtype) and dy_MD.dtype == w_FD.dtype == h_MF.dtype
  out_MF = (mosaic_dgelu_matmul if use else xla_dgelu_matmul)(dy_MD, w_FD, h_MF)
  return out_MF.reshape(h_BLF.shape)


def dgelu_matmul(dy_BLD, w_FD, h_BLF, kernel: bool):
  """(dY @ W^T) * gelu'(h) on each device's rows of the current mesh (constraint_mesh).

  A custom kernel is opaque to XLA's partitioner, so it runs under shard_map: rows split as the `batch` and
  `length` logical axes are, F as `act_mlp` is (a tensor-parallel W's rows go with it), D whole.
  """
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return _local_dgelu(dy_BLD, w_FD, h_BLF, kernel)
  *rows, mlp = nn.logical_to_mesh_axes(("batch", "length", "act_mlp"))
  return jax.shard_map(
    functools.partial(_local_dgelu, kernel=kernel),
    mesh=mesh,
    in_specs=(P(*rows, None), P(mlp, None), P(*rows, mlp)),
    out_specs=P(*rows, mlp),
    check_vma=False,
  )(dy_BLD, w_FD, h_BLF)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gelu_dot(h_BLF, w_FD, kernel: bool):
  """gelu_tanh(h) @ W; its gradient with respect to h from dgelu_matmul (the kernel when `kernel`)."""
  return gelu_tanh(h_BLF) @ w_FD


def _gelu_dot_fwd(h_BLF, w_FD, kernel):
  a_BLF = gelu_tanh(h_BLF)
  return a_BLF @ w_FD, (h_BLF, a_BLF, w_FD)


def _gelu_dot_bwd(kernel, residuals, dy_BLD):
  h_BLF, a_BLF, w_FD = residuals
  dh_BLF = dgelu_matmul(dy_BLD, w_FD, h_BLF, kernel)
  dw_FD = jnp.einsum("blf,bld->fd", a_BLF, dy_BLD.astype(a_BLF.dtype))
  return dh_BLF, dw_FD.astype(w_FD.dtype)


gelu_dot.defvjp(_gelu_dot_fwd, _gelu_dot_bwd)


def gelu_dot_general(kernel_axes, kernel: bool):
  """A dot_general for the down projection's flax Dense, fed the pre-activation h: gelu_dot after the FSDP
  weight gather (llm_jax.model.partitioning.gathering_dot). Same parameters as a Dense fed gelu(h)."""

  def product(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or lhs.ndim != 3:
      raise ValueError(f"gelu_dot_general: a [B, L, F] @ [F, D] product, got {dimension_numbers}")
    return gelu_dot(lhs, rhs, kernel)

  return gathering_dot(kernel_axes, product=product)
