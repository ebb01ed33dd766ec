"""Expert parallelism with 2 real gloo processes: equality with the single-process layer."""

from __future__ import annotations

import os
import socket
import traceback
from copy import deepcopy

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from damex.moe import (
    MoEFFN,
    RoutingStats,
    expert_parameter_names,
    idle_expert_parallel_forward,
    ignore_expert_params_in_ddp,
    scale_expert_grads_,
)

WORLD = 2
TOKENS = (11, 6)  # uneven token counts per rank
KW = dict(d_model=8, hidden_dim=12, num_experts=4, top_k=2, capacity_factor=1.0, gate_noise=0.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(TOKENS[rank], 8, generator=g) * 2
    token_image = torch.arange(TOKENS[rank]) // 4
    weight = torch.randn(TOKENS[rank], 8, generator=g)  # loss = (y * weight).sum()
    return x, token_image, weight


class _Net(nn.Module):
    def __init__(self, moe: MoEFFN) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor, token_image: torch.Tensor) -> torch.Tensor:
        return self.moe(x, token_image)[0]


def _check(rank: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    full = MoEFFN(**KW)
    torch.manual_seed(0)
    ep = MoEFFN(**KW, expert_parallel_group=dist.group.WORLD)
    assert ep.num_local_experts == 2 and ep.expert_offset == 2 * rank
    assert ep.experts.expert_ids == [2 * rank, 2 * rank + 1]
    full_params = dict(full.experts.named_parameters())
    for name, p in ep.experts.named_parameters():  # same names (global ids), same values
        assert torch.equal(p, full_params[name]), name
    assert torch.equal(ep.router.weight, full.router.weight)

    # expert-parallel forward/backward on this rank's tokens
    x, ti, w = _rank_data(rank)
    x_ep = x.clone().requires_grad_()
    y_ep, info_ep = ep(x_ep, ti)
    (y_ep * w).sum().backward()

    # reference: the single-process layer on each rank's tokens; expert gradients sum over
    # all ranks' tokens, router and input gradients come from this rank's tokens only
    ref = {}
    for r in range(WORLD):
        xr, tir, wr = _rank_data(r)
        xr.requires_grad_()
        yr, info_r = full(xr, tir)
        router_grad = torch.autograd.grad((yr * wr).sum(), full.router.weight, retain_graph=True)
        (yr * wr).sum().backward()
        ref[r] = (yr.detach(), info_r, xr.grad, router_grad[0])
    y_ref, info_ref, x_grad_ref, router_grad_ref = ref[rank]

    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_ep, y_ref, **tol)
    assert torch.equal(info_ep.kept, info_ref.kept) and (~info_ep.kept).any()
    torch.testing.assert_close(x_ep.grad, x_grad_ref, **tol)
    torch.testing.assert_close(ep.router.weight.grad, router_grad_ref, **tol)
    for name, p in ep.experts.named_parameters():
        torch.testing.assert_close(p.grad, full_params[name].grad, **tol)

    # DDP: expert params ignored (rank-local), their gradients scaled by 1/W; the router's
    # gradient is averaged over the ranks by DDP
    net = _Net(ep)
    names = ignore_expert_params_in_ddp(net)
    assert names == expert_parameter_names(net)
    assert set(names) == {f"moe.experts.{n}" for n, _ in ep.experts.named_parameters()}
    ddp = DistributedDataParallel(net)
    for name, p in ep.experts.named_parameters():  # DDP did not overwrite rank 1's experts
        assert torch.equal(p, full_params[name]), name
    net.zero_grad()
    (ddp(x, ti) * w).sum().backward()
    assert scale_expert_grads_(net, 1.0 / WORLD) == len(names)
    for name, p in ep.experts.named_parameters():
        expected = full_params[name].grad / WORLD
        torch.testing.assert_close(p.grad, expected, **tol)
    router_mean = (ref[0][3] + ref[1][3]) / WORLD
    torch.testing.assert_close(ep.router.weight.grad, router_mean, **tol)

    # a rank without tokens joins the others' all-to-alls: rank 1 idles, rank 0's output is the
    # single-process one (its tokens routed to rank 1's experts are computed there)
    copy = deepcopy(ep)  # an EMA-style copy shares the process group
    assert copy.expert_parallel_group is ep.expert_parallel_group
    with torch.no_grad():
        if rank == 0:
            y0, _ = copy(x, ti)
            torch.testing.assert_close(y0, y_ref, **tol)
        else:
            assert idle_expert_parallel_forward(_Net(copy)) == 1

    # routing statistics all-reduced over the ranks == statistics of both ranks' tokens
    stats = RoutingStats(1, 2, 4)
    stats.update([info_ep], image_dataset=torch.tensor([rank, 1 - rank, rank]))
    stats.all_reduce_()
    reference = RoutingStats(1, 2, 4)
    for r in range(WORLD):
        reference.update([ref[r][1]], image_dataset=torch.tensor([r, 1 - r, r]))
    assert torch.equal(stats.top1, reference.top1)
    assert torch.equal(stats.dropped, reference.dropped)


def _worker(rank: int, port: int, errfile: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        _check(rank)
        dist.barrier()  # no rank closes its gloo pairs while the other may still use them
    except BaseException:
        with open(f"{errfile}.{rank}", "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def test_expert_parallel_equals_single_process(tmp_path) -> None:
    errfile = str(tmp_path / "err")
    try:
        mp.spawn(_worker, args=(_free_port(), errfile), nprocs=WORLD, join=True)
    except Exception as exc:  # show the worker's traceback, not only the spawn wrapper's
        details = [
            open(f"{errfile}.{r}").read() for r in range(WORLD) if os.path.exists(f"{errfile}.{r}")
        ]
        raise AssertionError("\n".join(details) or str(exc)) from exc
