"""samplers.integrations.diffusers: our solvers inside unmodified diffusers pipelines, diffusers networks as
Models, and diffusers' own schedulers reproduced with sample().

Networks are built from configs with random weights (no downloads), tiny, so every run takes a fraction of
a second on one CPU core.  "Equal" means bit-identical: the pipeline's loop drives one sample() run, so the
same network calls see the same states.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DConditionModel,
    UNet2DModel,
    UniPCMultistepScheduler,
)

from samplers import sample
from samplers.integrations import (
    SolverScheduler,
    diffusers_grid,
    equivalent_solver,
    from_diffusers,
)
from sde import DiscreteVPSDE, RectifiedFlowSDE
from solvers import ERSDE, AdaptiveDPMSolver, DPMSolver, Euler, Heun, Restart, UniPC

SIZE = 8


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


def _noise(batch=2, seed=1):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


SCHEDULES = {
    "eps-linear": dict(prediction_type="epsilon", beta_schedule="linear"),
    "v-cosine": dict(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2"),
}
SOLVERS = {
    "DPMSolver(2)": lambda: DPMSolver(2),
    "UniPC": lambda: UniPC(),
    "ERSDE(3)": lambda: ERSDE(3),
    "Heun": lambda: Heun(),
    "Restart": lambda: Restart(),
}


def _pipeline_run(unet, base, solver, calls=8, seed=3, batch=2):
    pipe = DDPMPipeline(unet=unet, scheduler=base)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = SolverScheduler.from_config(base.config, solver=solver, seed=seed)
    images = pipe(batch_size=batch, generator=torch.Generator().manual_seed(1), num_inference_steps=calls,
                  output_type="pt").images
    return images, pipe.scheduler


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("solver_name", SOLVERS)
def test_ddpm_pipeline_with_our_scheduler_equals_sample(unet, schedule, solver_name):
    base = DDPMScheduler(**SCHEDULES[schedule])
    calls = 8
    images, scheduler = _pipeline_run(unet, base, SOLVERS[solver_name](), calls)
    assert 1 <= len(scheduler.timesteps) <= calls
    ours = sample(from_diffusers(unet, base), SOLVERS[solver_name](), x_T=_noise(), grid=scheduler.grid, seed=3)
    ours = (ours / 2 + 0.5).clamp(0, 1)  # DDPMPipeline's output transform
    assert torch.equal(images, ours), f"max |pipeline - sample()| = {(images - ours).abs().max():.3e}"


def test_pipeline_negative_control_another_seed_differs(unet):
    base = DDPMScheduler()
    images, scheduler = _pipeline_run(unet, base, ERSDE(3), seed=3)
    other = sample(from_diffusers(unet, base), ERSDE(3), x_T=_noise(), grid=scheduler.grid, seed=4)
    assert (images - (other / 2 + 0.5).clamp(0, 1)).abs().max() > 1e-3


class CountingNet(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)

    @property
    def config(self):
        return self.net.config

    @property
    def dtype(self):
        return self.net.dtype


@pytest.mark.parametrize("solver, calls, expected", [(DPMSolver(2), 10, 10), (Heun(), 10, 9), (Heun(), 2, 1),
                                                     (DPMSolver(3, variant="singlestep"), 10, 10),
                                                     (DPMSolver(2), 1, 1)])
def test_num_inference_steps_counts_network_calls(unet, solver, calls, expected):
    scheduler = SolverScheduler.from_config(DDPMScheduler().config, solver=solver)
    scheduler.set_timesteps(calls)
    assert len(scheduler.timesteps) == expected
    net = CountingNet(unet)
    x = _noise()
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t).sample, t, x).prev_sample
    assert net.calls == expected and torch.isfinite(x).all()


def test_multi_call_solvers_list_every_call(unet):
    scheduler = SolverScheduler.from_config(DDPMScheduler().config, solver=Heun())
    scheduler.set_timesteps(7)
    grid_steps = scheduler.sde.timestep(scheduler.grid).to(torch.float32)
    # Heun calls at each step's start and end, then the final denoising call at the last time
    expected = torch.stack([grid_steps[:-1], grid_steps[1:]], dim=1).reshape(-1).tolist() + [grid_steps[-1].item()]
    assert scheduler.timesteps.tolist() == expected


def test_adaptive_solver_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="adaptive.*cannot be listed in advance"):
        SolverScheduler.from_config(DDPMScheduler().config, solver=AdaptiveDPMSolver())
    with pytest.raises(TypeError, match="solver must be a fixed-grid solver"):
        SolverScheduler(solver="dpm")
    with pytest.raises(ValueError, match="grid_kind"):
        SolverScheduler(grid_kind="cosine")


def test_seed_from_the_pipelines_generator_is_reproducible(unet):
    base = DDPMScheduler()
    pipe = DDPMPipeline(unet=unet, scheduler=SolverScheduler.from_config(base.config, solver=ERSDE(3)))
    pipe.set_progress_bar_config(disable=True)
    runs = [pipe(batch_size=2, generator=torch.Generator().manual_seed(s), num_inference_steps=6, output_type="pt")
            for s in (5, 5, 6)]
    assert torch.equal(runs[0].images, runs[1].images)
    assert not torch.equal(runs[0].images, runs[2].images)
    seed = pipe.scheduler.last_seed
    ours = sample(from_diffusers(unet, base), ERSDE(3), x_T=torch.randn(2, 3, SIZE, SIZE,
                  generator=torch.Generator().manual_seed(6)), grid=pipe.scheduler.grid, seed=seed)
    assert torch.equal(runs[2].images, (ours / 2 + 0.5).clamp(0, 1))


def test_state_replaced_between_calls_is_used(unet):
    # callback_on_step_end may hand back new latents: the next call starts from them.  DPMSolver(1) (DDIM)
    # carries nothing but x, so the rest of the run is a fresh run from the replaced state
    base = DDPMScheduler()
    scheduler = SolverScheduler.from_config(base.config, solver=DPMSolver(1))
    scheduler.set_timesteps(5)
    x = _noise()
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        if i == 1:
            x = x * 0.5
            replaced = x.clone()
    model = from_diffusers(unet, base)
    assert torch.equal(x, sample(model, DPMSolver(1), x_T=replaced, grid=scheduler.grid[2:]))
    assert not torch.equal(x, sample(model, DPMSolver(1), x_T=_noise(), grid=scheduler.grid))


def test_img2img_add_noise_and_a_later_start(unet):
    base = DDPMScheduler()
    scheduler = SolverScheduler.from_config(base.config, solver=DPMSolver(2))
    scheduler.set_timesteps(10)
    x0 = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    start = 4
    t_start = scheduler.timesteps[start]
    noisy = scheduler.add_noise(x0, _noise(), t_start[None])
    sde = scheduler.sde
    t = sde.t_from_timestep(t_start.double())
    assert torch.allclose(noisy, sde.alpha(t).float() * x0 + sde.sigma(t).float() * _noise(), atol=1e-6)
    scheduler.set_begin_index(start)
    x = noisy
    for t in scheduler.timesteps[start:]:
        x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    ours = sample(from_diffusers(unet, base), DPMSolver(2), x_T=noisy, grid=scheduler.grid[start:])
    assert torch.equal(x, ours)
    heun = SolverScheduler.from_config(base.config, solver=Heun())
    heun.set_timesteps(9)
    with pytest.raises(ValueError, match="inside a step"):
        heun.step(_noise(), heun.timesteps[1], _noise())


def test_flow_matching_config_gives_rectified_flow_with_shift():
    base = FlowMatchEulerDiscreteScheduler(shift=3.0)
    model = from_diffusers(lambda x, t: -x, base)
    assert isinstance(model.sde, RectifiedFlowSDE) and model.predicts == "velocity"
    scheduler = SolverScheduler.from_config(base.config, solver=Euler())
    scheduler.set_timesteps(5)
    # shift 3 maps t = 0.5 to 0.75: grids crowd towards the noise end
    assert scheduler.grid[0] == 1.0 and float(scheduler.grid[1]) > 0.8
    # Euler on the velocity is FlowMatchEulerDiscrete's step: same sigmas, same result
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    theirs.set_timesteps(5)
    grid, final_denoise = diffusers_grid(theirs, 5)
    net = lambda x, t: torch.tanh(x) * (t.reshape(-1, 1) / 1000) - 0.3 * x
    x = _noise()[:, 0, 0]
    x_T = x.clone()
    for t in theirs.timesteps:
        x = theirs.step(net(x, t.expand(x.shape[0])), t, x).prev_sample
    ours = sample(from_diffusers(net, theirs), Euler(), x_T=x_T, grid=grid, final_denoise=final_denoise)
    assert (ours - x).abs().max() < 1e-5 * x.abs().max()
    with pytest.raises(ValueError, match="dynamic shifting"):
        from_diffusers(net, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))


def test_from_diffusers_reads_the_schedule_prediction_and_output_objects(unet):
    base = DDPMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear")
    model = from_diffusers(unet, base)
    assert isinstance(model.sde, DiscreteVPSDE) and model.predicts == "v" and model.time_input == "discrete"
    ac = model.sde.alpha(model.sde.t_from_timestep(torch.arange(1000, dtype=torch.float64))) ** 2
    assert torch.allclose(ac, base.alphas_cumprod.double(), rtol=1e-12)
    assert from_diffusers(unet, DDPMScheduler(prediction_type="sample")).predicts == "x0"
    # a config dict works as well as the scheduler, and a tuple output is unwrapped
    tuple_net = lambda x, t: (x * 0.1,)
    out = sample(from_diffusers(tuple_net, dict(base.config)), DPMSolver(1), x_T=_noise(), steps=2)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="prediction_type"):
        from_diffusers(unet, base, prediction_type="noise")
    with pytest.raises(TypeError, match="network must be callable"):
        from_diffusers(3, base)
    with pytest.raises(TypeError, match="returned str"):
        sample(from_diffusers(lambda x, t: "x", base), DPMSolver(1), x_T=_noise(), steps=2)


# -- a Stable-Diffusion-style loop with classifier-free guidance -----------------------------------------------------


def test_conditional_unet_in_a_cfg_loop_equals_sample():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=SIZE, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12,
                                attention_head_dim=4, norm_num_groups=4).eval()
    base = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    text = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(2))
    empty = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3))
    embeddings = torch.cat([empty, text])
    scale = 5.0

    def guided(x, t, encoder_hidden_states):
        both = unet(torch.cat([x] * 2), torch.cat([t] * 2), encoder_hidden_states=encoder_hidden_states).sample
        uncond, cond = both.chunk(2)
        return uncond + scale * (cond - uncond)

    # the loop of StableDiffusionPipeline.__call__, with our scheduler
    scheduler = SolverScheduler.from_config(base.config, solver=UniPC(), seed=0)
    scheduler.set_timesteps(6)
    latents = torch.randn(2, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(4)) * scheduler.init_noise_sigma
    x_T = latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = unet(model_input, t, encoder_hidden_states=embeddings).sample
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + scale * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
    ours = sample(from_diffusers(guided, base), UniPC(), x_T=x_T, grid=scheduler.grid,
                  cond={"encoder_hidden_states": embeddings})
    assert torch.equal(latents, ours), f"max |loop - sample()| = {(latents - ours).abs().max():.3e}"


# -- diffusers' schedulers reproduced with sample() -----------------------------------------------------------------

REPRODUCED = {
    "DPMSolverMultistep": lambda spacing: DPMSolverMultistepScheduler(timestep_spacing=spacing,
                                                                      final_sigmas_type="zero"),
    "UniPCMultistep": lambda spacing: UniPCMultistepScheduler(timestep_spacing=spacing, final_sigmas_type="zero"),
    "DDIM": lambda spacing: DDIMScheduler(timestep_spacing=spacing, clip_sample=False),
    "EulerDiscrete": lambda spacing: EulerDiscreteScheduler(timestep_spacing=spacing),
}
#: float32 rounding, relative to max|x|: the x0 estimate at timestep 999 divides by alpha = 0.0064
FLOAT32_BOUND = 4e-6


def _toy_eps(x, t):
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return torch.tanh(0.7 * x + torch.sin(t / 150.0)) * 0.8 + 0.1 * x


def _diffusers_run(scheduler, steps, x_T, **step_kwargs):
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(_toy_eps(scheduler.scale_model_input(x, t), t), t, x, **step_kwargs).prev_sample
    return x


def _our_run(scheduler, steps, x_T, solver=None):
    model = from_diffusers(_toy_eps, scheduler)
    grid, final_denoise = diffusers_grid(scheduler, steps)
    solver = equivalent_solver(scheduler) if solver is None else solver
    x = x_T * scheduler.init_noise_sigma
    if isinstance(scheduler, EulerDiscreteScheduler):  # its state is x / alpha
        x = x * model.sde.alpha(grid[:1]).float()
    if grid.numel() == 1:
        return model.denoise(x, grid)
    return sample(model, solver, x_T=x, grid=grid, final_denoise=final_denoise)


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("name", REPRODUCED)
def test_diffusers_schedulers_reproduced_to_float32_rounding(name, spacing, steps):
    x_T = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(0))
    scheduler = REPRODUCED[name](spacing)
    if name == "DDIM" and spacing == "linspace" and steps > 1:
        with pytest.raises(ValueError, match="do not form a grid"):
            diffusers_grid(scheduler, steps)
        return
    theirs = _diffusers_run(scheduler, steps, x_T)
    ours = _our_run(scheduler, steps, x_T)
    relative = float((ours - theirs).abs().max() / theirs.abs().max())
    assert relative < FLOAT32_BOUND, f"{name} {spacing} {steps}: max|ours - diffusers| / max|diffusers| = {relative:.2e}"


@pytest.mark.parametrize("name", ["DPMSolverMultistep", "UniPCMultistep"])
def test_reproduction_negative_control_lower_order_final(name):
    # our default lowers the last step's order below 10 steps; diffusers (at order 2) does not
    x_T = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(0))
    scheduler = REPRODUCED[name]("trailing")
    theirs = _diffusers_run(scheduler, 5, x_T)
    solver = DPMSolver(2) if name == "DPMSolverMultistep" else UniPC()
    ours = _our_run(scheduler, 5, x_T, solver=solver)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) > 100 * FLOAT32_BOUND


def test_ddim_clip_sample_is_the_clipped_model_output_step():
    x_T = torch.randn(4, 3, 6, generator=torch.Generator().manual_seed(0))
    scheduler = DDIMScheduler(timestep_spacing="trailing", clip_sample=True)
    theirs = _diffusers_run(scheduler, 10, x_T, use_clipped_model_output=True)
    ours = _our_run(scheduler, 10, x_T)
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < FLOAT32_BOUND


def test_equivalent_solver_refuses_what_it_cannot_match():
    with pytest.raises(ValueError, match="no equivalent for DDPMScheduler"):
        equivalent_solver(DDPMScheduler())
    with pytest.raises(ValueError, match="sde-dpmsolver"):
        equivalent_solver(DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"))


def test_pipeline_equals_sample_with_the_same_generator(unet):
    # sample(generator=...) draws the starting noise as the pipeline's randn_tensor does: no x_T needed
    base = DDPMScheduler()
    images, scheduler = _pipeline_run(unet, base, DPMSolver(2))
    ours = sample(from_diffusers(unet, base), DPMSolver(2), shape=(2, 3, SIZE, SIZE), grid=scheduler.grid,
                  generator=torch.Generator().manual_seed(1))
    assert torch.equal(images, (ours / 2 + 0.5).clamp(0, 1))


def test_an_abandoned_loop_is_cancelled_by_the_next_set_timesteps(unet):
    base = DDPMScheduler()
    scheduler = SolverScheduler.from_config(base.config, solver=Heun())
    scheduler.set_timesteps(7)
    x = _noise()
    for t in scheduler.timesteps[:3]:  # the pipeline stops (an exception, an interrupt) mid-run
        x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    worker = scheduler._run.thread
    scheduler.set_timesteps(7)
    assert not worker.is_alive()
    x = _noise()
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    assert torch.equal(x, sample(from_diffusers(unet, base), Heun(), x_T=_noise(), grid=scheduler.grid))


def test_ddim_pipeline_runs_our_scheduler_and_refuses_its_eta(unet):
    from diffusers import DDIMPipeline

    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = SolverScheduler.from_config(pipe.scheduler.config, solver=Heun())
    images = pipe(batch_size=2, num_inference_steps=7, generator=torch.Generator().manual_seed(1),
                  output_type="np").images
    ours = sample(from_diffusers(unet, pipe.scheduler), Heun(), shape=(2, 3, SIZE, SIZE), grid=pipe.scheduler.grid,
                  generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.from_numpy(images), (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="eta=0.5"):
        pipe(batch_size=2, num_inference_steps=7, eta=0.5)


@pytest.mark.parametrize("solver", [Heun(), ERSDE(3)], ids=repr)
def test_flow_matching_scheduler_loop_equals_sample(solver):
    base = FlowMatchEulerDiscreteScheduler(shift=3.0)
    net = lambda x, t: torch.tanh(x) * (t.reshape(-1, 1) / 1000) - 0.3 * x
    scheduler = SolverScheduler.from_config(base.config, solver=solver, seed=2)
    scheduler.set_timesteps(9)
    assert float(scheduler.timesteps[0]) == 1000.0  # diffusers' flow convention: timestep = 1000 sigma
    x = _noise()[:, 0, 0]
    x_T = x.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t.expand(x.shape[0])), t, x).prev_sample
    ours = sample(from_diffusers(net, base), solver, x_T=x_T, grid=scheduler.grid, seed=2)
    assert torch.equal(x, ours)


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_diffusers_timesteps_are_ddims(spacing, steps_offset):
    from samplers.integrations.diffusers import diffusers_timesteps

    for steps in (1, 3, 7, 10, 50):
        theirs = DDIMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
        theirs.set_timesteps(steps)
        offset = steps_offset if spacing == "leading" else 0  # DDIM adds the offset to leading spacing only
        ours = diffusers_timesteps(1000, steps, spacing, offset)
        assert ours.tolist() == theirs.timesteps.double().tolist(), (spacing, steps)
    with pytest.raises(ValueError, match="spacing must be one of"):
        diffusers_timesteps(1000, 5, "even")
    # the scheduler's grid_kind uses them: N calls of a one-call solver are DDIM's N timesteps
    scheduler = SolverScheduler(grid_kind=spacing, steps_offset=offset, solver=DPMSolver(2))
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.double().tolist() == diffusers_timesteps(1000, 10, spacing, offset).tolist()
