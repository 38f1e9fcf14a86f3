"""``sfw rl``: train an agent in the world model's imagination, evaluate it in the real simulator.

A stable-baselines3 agent (PPO or SAC) learns inside a :class:`~selfflow_world.envs.dream.DreamVecEnv`:
``envs`` imagined episodes stepped in one batched model call per step, rewards and terminations from
the model's heads (``sfw heads``), episodes of ``horizon`` agent steps from real-env starts (or a
dataset's windows, ``start=DATASET``). The policy is saved to ``out/policy.zip``, with TensorBoard
curves under ``out/tb`` (``rollout/ep_rew_mean`` is the imagined return).

Then it acts in the real env. Its observation there is the one it was trained on, computed from the
real frames by :meth:`~selfflow_world.envs.dream.DreamEnv.observe_real`: with
``observation=features``, :meth:`~selfflow_world.world_model.WorldModel.clip_features` of the last
``history + 1`` real frames and their actions (the model's features of the newest real frame given
the frames before it, mean-pooled over tokens: what the dream env computes for an imagined frame),
not a rollout state fed with real frames, so nothing imagined enters the real episode. Each
evaluation episode starts as a dream episode does (the env reset with the episode's seed, then
``history - 1`` mid-range actions) and runs ``horizon`` agent steps (or until the env ends it);
returns count the rewards of those steps. Arms on the same seeds: ``policy`` (deterministic
actions) and ``random`` (uniform random actions). Beside each real return stands the imagined
return of the same arm from the same start (the dream env reset with the same seed; the random arm
replays the same action sequence there), so the reward model's bias shows. Means come with 95%
t intervals (:func:`~selfflow_world.metrics.mean_ci`).

Written to ``out``: ``policy.zip``, ``tb/``, ``report.json``, ``report.md``, ``returns.png`` and
``episode_0000.gif``/``.mp4`` (the policy in the real env beside its imagined episode from the
same start). ``load=FILE`` (an earlier run's ``policy.zip`` or its directory) skips training and
evaluates that policy again, e.g. over more episodes or longer ones; ``algo``, ``ckpt`` and
``observation`` must be those it was trained with.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from selfflow_world.errors import UserError, check_count, check_positive

ALGOS = ("ppo", "sac")
NETWORKS = {"mlp": "MlpPolicy", "cnn": "CnnPolicy"}  # SB3 policy classes
EVAL_SEED_OFFSET = 7919  # evaluation starts: env seeds of fresh episodes, as sfw plan draws them


@dataclass
class RLConfig:
    """Settings of ``sfw rl`` (documented in configs/rl.yaml)."""

    ckpt: str = "reacher-easy"
    algo: str = "ppo"
    steps: int = 100_000  # agent steps in imagination (all envs together)
    envs: int = 64
    horizon: int = 50
    observation: str = "features"
    reward: str = (
        "heads"  # heads (the reward/termination heads) or target (minus a probe's finger-to-target distance)
    )
    network: str = "auto"  # mlp (SB3's MlpPolicy) for features, cnn (CnnPolicy) for frames
    start: str = "env"
    sampler_steps: int = 1
    lr: float = 0.0003
    gamma: float = 0.99
    batch_size: int = 256
    n_steps: int = 32  # PPO: steps per env per rollout
    n_epochs: int = 10  # PPO
    buffer_size: int = 100_000  # SAC
    learning_starts: int = 1000  # SAC
    gradient_steps: int = 1  # SAC: per vec-env step
    eval_episodes: int = 5
    eval_steps: Optional[int] = None  # noqa: UP045 - real agent steps per evaluation episode (None: horizon)
    videos: int = 1
    seed: int = 0
    device: str = "auto"
    tensorboard: bool = True
    load: Optional[str] = None  # noqa: UP045 - a saved policy .zip (or its run directory) to evaluate instead of training
    out: str = "???"

    def check(self) -> None:
        if self.out in ("???", "", None):
            raise UserError("out= is required (e.g. sfw rl ckpt=reacher-easy algo=ppo steps=20000 out=DIR)")
        if self.algo not in ALGOS:
            raise UserError(f"algo must be one of {ALGOS}, got {self.algo!r}")
        if self.network not in ("auto", *NETWORKS):
            raise UserError(f"network must be auto, mlp or cnn, got {self.network!r}")
        from selfflow_world.envs.dream import OBSERVATIONS, REWARDS

        if self.observation not in OBSERVATIONS:
            raise UserError(f"observation must be one of {OBSERVATIONS}, got {self.observation!r}")
        if self.reward not in REWARDS:
            raise UserError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        for name in (
            "steps",
            "envs",
            "horizon",
            "batch_size",
            "n_steps",
            "n_epochs",
            "buffer_size",
            "eval_episodes",
        ):
            check_count(name, getattr(self, name))
        if self.eval_steps is not None:
            check_count("eval_steps", self.eval_steps)
        for name in ("learning_starts", "gradient_steps", "videos"):
            check_count(name, getattr(self, name), minimum=0)
        if not 1 <= self.sampler_steps <= 50:
            raise UserError(f"sampler_steps must be in [1, 50], got {self.sampler_steps}")
        check_positive("lr", self.lr)
        if not 0 < self.gamma <= 1:
            raise UserError(f"gamma must be in (0, 1], got {self.gamma}")
        if self.load in ("", "???"):
            self.load = None

    @property
    def real_steps(self) -> int:
        """Agent steps of a real evaluation episode."""
        return self.horizon if self.eval_steps is None else self.eval_steps

    @property
    def resolved_policy(self) -> str:
        """The SB3 policy class name."""
        if self.network != "auto":
            return NETWORKS[self.network]
        return "CnnPolicy" if self.observation == "frames" else "MlpPolicy"


def eval_seeds(cfg: RLConfig) -> list[int]:
    """Env seeds of the evaluation episodes (fresh episodes: not the training data's seeds)."""
    from selfflow_world.envs.collect import episode_seeds

    return [episode_seeds(cfg.seed + EVAL_SEED_OFFSET, i)[0] for i in range(cfg.eval_episodes)]


def _progress_callback(total: int, desc: str, progress: bool):
    """A callback with a tqdm bar over agent steps that also records the imagined episodes."""
    from stable_baselines3.common.callbacks import BaseCallback

    class Progress(BaseCallback):
        def __init__(self):
            super().__init__()
            self.bar = None
            self.episodes: list[tuple[int, float]] = []  # (agent steps so far, imagined return)

        def _on_training_start(self) -> None:
            if progress:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="step")

        def _on_step(self) -> bool:
            for info in self.locals.get("infos", []):
                if "episode" in info:
                    self.episodes.append((int(self.num_timesteps), float(info["episode"]["r"])))
            if self.bar is not None:
                self.bar.update(self.training_env.num_envs)
                if self.episodes:
                    recent = [r for _, r in self.episodes[-100:]]
                    self.bar.set_postfix_str(f"imagined return {np.mean(recent):.2f}")
            return True

        def _on_training_end(self) -> None:
            if self.bar is not None:
                self.bar.close()

    return Progress()


def make_agent(cfg: RLConfig, venv, out: Path):
    """The SB3 agent of ``cfg`` on ``venv`` (MLP policies on the CPU, where SB3 runs them best)."""
    from stable_baselines3 import PPO, SAC

    from selfflow_world.runtime import resolve_device

    policy = cfg.resolved_policy
    device = "cpu" if policy == "MlpPolicy" else resolve_device(cfg.device)
    common = {
        "learning_rate": cfg.lr,
        "gamma": cfg.gamma,
        "seed": cfg.seed,
        "device": device,
        "verbose": 0,
        "tensorboard_log": str(out / "tb") if cfg.tensorboard else None,
    }
    if cfg.algo == "ppo":
        rollout = cfg.n_steps * venv.num_envs
        return PPO(
            policy,
            venv,
            n_steps=cfg.n_steps,
            batch_size=min(cfg.batch_size, rollout),
            n_epochs=cfg.n_epochs,
            **common,
        )
    return SAC(
        policy,
        venv,
        batch_size=cfg.batch_size,
        buffer_size=cfg.buffer_size,
        learning_starts=cfg.learning_starts,
        gradient_steps=cfg.gradient_steps,
        **common,
    )


def real_episode(env, dream, act, seed: int, steps: int) -> dict[str, Any]:
    """One episode in the real env from the dream envs' start for ``seed``: ``act(obs, t)`` gives
    the action from the observation the dream env would give for the real frames so far. Returns
    the return, the rewards per step, the steps taken and the real frames (context included)."""
    from selfflow_world.envs.dream import env_context

    frames, actions = env_context(env, seed, dream.wm.history)
    frames, actions = list(frames), list(actions)
    rewards: list[float] = []
    for t in range(steps):
        obs = dream.observe_real(
            np.stack(frames[-dream.wm.history - 1 :]), np.stack(actions[-dream.wm.history - 1 :])
        )
        action = np.clip(np.asarray(act(obs, t), np.float32), env.action_space.low, env.action_space.high)
        frame, reward, terminated, truncated, _ = env.step(action)
        frames.append(frame)
        actions.append(action)
        rewards.append(float(reward))
        if terminated or truncated:
            break
    return {"return": sum(rewards), "rewards": rewards, "steps": len(rewards), "frames": np.stack(frames)}


def dream_episode(dream, act, seed: int) -> dict[str, Any]:
    """One imagined episode of ``dream`` (a :class:`DreamEnv`) reset with ``seed``."""
    obs, _ = dream.reset(seed=seed)
    frames = [dream.render().copy()]
    total, taken, done = 0.0, 0, False
    while not done:
        obs, reward, terminated, truncated, _ = dream.step(act(obs, taken))
        frames.append(dream.render().copy())
        total += float(reward)
        taken += 1
        done = terminated or truncated
    return {"return": total, "steps": taken, "frames": np.stack(frames)}


def evaluate(cfg: RLConfig, agent, wm, out: Path) -> tuple[dict[str, Any], list[str]]:
    """Policy and random arms in the real env and in imagination over the same seeds; the video of
    the first ``cfg.videos`` policy episodes."""
    from selfflow_world.envs import make
    from selfflow_world.envs.dream import DreamEnv, close_env
    from selfflow_world.video import label, write_video

    render = wm.meta.get("render", {})
    env_name = wm.meta.get("env")
    if not env_name:
        raise UserError(
            f"the model {cfg.ckpt} does not say which env it was trained on; it cannot be evaluated"
        )
    env = make(
        env_name,
        size=wm.config.image_size,
        camera=render.get("camera"),
        action_repeat=render.get("action_repeat"),
    )
    dream = DreamEnv(
        wm,
        horizon=cfg.horizon,
        steps=cfg.sampler_steps,
        start="env",
        observation=cfg.observation,
        reward=cfg.reward,
    )
    low, high = env.action_space.low, env.action_space.high
    expected = dream.observation_space.shape
    # SB3 stores image spaces channel-first and transposes frames itself: compare sizes, not layouts
    if (
        np.prod(agent.observation_space.shape) != np.prod(expected)
        or agent.action_space.shape != env.action_space.shape
    ):
        dream.close()
        close_env(env)
        raise UserError(
            f"the policy observes {agent.observation_space.shape} and acts in {agent.action_space.shape}; "
            f"observation={cfg.observation} of {cfg.ckpt} gives {expected} and {env_name} takes "
            f"{env.action_space.shape}: give the ckpt and observation it was trained with"
        )

    def policy(obs, t):
        return agent.predict(obs, deterministic=True)[0]

    rows: dict[str, list[dict[str, Any]]] = {"policy": [], "random": []}
    videos: list[str] = []
    length = max(cfg.horizon, cfg.real_steps)  # the random plan serves the real and the imagined episode
    try:
        for number, seed in enumerate(eval_seeds(cfg)):
            plan = np.random.default_rng([cfg.seed, seed]).uniform(low, high, (length, len(low)))
            randomly = lambda obs, t, plan=plan: plan[t].astype(np.float32)  # noqa: E731
            for arm, act in (("policy", policy), ("random", randomly)):
                real = real_episode(env, dream, act, seed, cfg.real_steps)
                imagined = dream_episode(dream, act, seed)
                rows[arm].append(
                    {
                        "episode": number,
                        "env_seed": int(seed),
                        "return": real["return"],
                        # over the imagined episode's length: the figure to set beside the imagined return
                        "return_at_horizon": float(sum(real["rewards"][: cfg.horizon])),
                        "steps": real["steps"],
                        "imagined_return": imagined["return"],
                        "imagined_steps": imagined["steps"],
                    }
                )
                if arm == "policy" and number < cfg.videos:
                    videos += _video(
                        real["frames"], imagined["frames"], out / f"episode_{number:04d}", label, write_video
                    )
    finally:
        dream.close()
        close_env(env)
    return rows, videos


def _video(real: np.ndarray, imagined: np.ndarray, path: Path, label, write_video) -> list[str]:
    """real | imagined, from the same start, scaled up to at least 128 pixels."""
    length = max(len(real), len(imagined))
    real = np.concatenate([real, np.repeat(real[-1:], length - len(real), 0)])
    imagined = np.concatenate([imagined, np.repeat(imagined[-1:], length - len(imagined), 0)])
    scale = max(1, math.ceil(128 / real.shape[1]))
    panels = [
        label(frames.repeat(scale, 1).repeat(scale, 2), text)
        for frames, text in ((real, "real env"), (imagined, "imagined"))
    ]
    return [str(f) for f in write_video(path, np.concatenate(panels, axis=2), fps=8)]


def paired_gain(rows: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """The policy's real return minus random's, episode by episode (both arms start from the same
    seeds, so the pairing removes how hard each start is): mean with a 95% t interval."""
    from selfflow_world.metrics import mean_ci

    gains = [p["return"] - r["return"] for p, r in zip(rows["policy"], rows["random"], strict=True)]
    mean, low, high = mean_ci(gains)
    return {"mean": mean, "low": low, "high": high}


def summarise(cfg: RLConfig, rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per arm: real and imagined mean returns with 95% t intervals."""
    from selfflow_world.metrics import mean_ci

    arms = {}
    for arm, episodes in rows.items():
        real = mean_ci([e["return"] for e in episodes])
        at_horizon = mean_ci([e["return_at_horizon"] for e in episodes])
        imagined = mean_ci([e["imagined_return"] for e in episodes])
        arms[arm] = {
            "episodes": len(episodes),
            "return_mean": real[0],
            "return_low": real[1],
            "return_high": real[2],
            "return_at_horizon_mean": at_horizon[0],
            "return_at_horizon_low": at_horizon[1],
            "return_at_horizon_high": at_horizon[2],
            "imagined_return_mean": imagined[0],
            "imagined_return_low": imagined[1],
            "imagined_return_high": imagined[2],
            "steps_mean": float(np.mean([e["steps"] for e in episodes])),
            "per_episode": episodes,
        }
    return arms


def run_rl(cfg: RLConfig, wm=None, progress: bool = True) -> dict[str, Any]:
    """Train in imagination, save the policy, evaluate in the real env; writes the report."""
    from selfflow_world.envs.dream import DreamVecEnv
    from selfflow_world.heads import missing_heads_message
    from selfflow_world.runtime import resolve_device
    from selfflow_world.world_model import WorldModel

    cfg.check()
    if wm is None:
        wm = WorldModel.load(cfg.ckpt, device=resolve_device(cfg.device))
    if wm.heads is None and (cfg.reward == "heads" or cfg.observation == "features"):
        raise UserError(missing_heads_message(cfg.ckpt))
    if cfg.resolved_policy == "CnnPolicy" and cfg.observation != "frames":
        raise UserError(f"network=cnn needs observation=frames ({cfg.observation} are a vector: network=mlp)")
    if cfg.resolved_policy == "CnnPolicy" and wm.config.image_size < 36:
        raise UserError(
            f"CnnPolicy needs frames of at least 36x36 pixels, the model's are {wm.config.image_size}; "
            "use observation=features or network=mlp"
        )
    out = Path(cfg.out)
    if cfg.load is not None:  # evaluate a saved policy: nothing is trained or overwritten
        agent = load_agent(cfg)
        out.mkdir(parents=True, exist_ok=True)
        return _report(cfg, wm, agent, out, None, str(_policy_file(cfg.load)))
    out.mkdir(parents=True, exist_ok=True)
    venv = DreamVecEnv(
        wm,
        cfg.envs,
        horizon=cfg.horizon,
        steps=cfg.sampler_steps,
        start=cfg.start,
        observation=cfg.observation,
        reward=cfg.reward,
        seed=cfg.seed,
    )
    try:
        agent = make_agent(cfg, venv, out)
        callback = _progress_callback(cfg.steps, f"rl {cfg.algo} in imagination", progress)
        t0 = time.perf_counter()
        agent.learn(total_timesteps=cfg.steps, callback=callback, tb_log_name=cfg.algo)
        seconds = time.perf_counter() - t0
    finally:
        venv.close()  # before the evaluation's envs exist (see dream.close_env)
    agent.save(out / "policy")
    episodes = callback.episodes
    recent = [r for _, r in episodes[-100:]]
    training = {
        "agent_steps": int(agent.num_timesteps),
        "seconds": seconds,
        "steps_per_s": agent.num_timesteps / seconds if seconds > 0 else math.nan,
        "imagined_episodes": len(episodes),
        "imagined_return_last_100": float(np.mean(recent)) if recent else None,
        "imagined_return_first_100": float(np.mean([r for _, r in episodes[:100]])) if episodes else None,
        "curve": episodes[:: max(1, len(episodes) // 200)],
    }
    return _report(cfg, wm, agent, out, training, str(out / "policy.zip"))


def _policy_file(path: str) -> Path:
    """The policy file ``load=`` names: a .zip, or a run directory holding ``policy.zip``."""
    given = Path(path)
    found = given / "policy.zip" if given.is_dir() else given
    if not found.is_file():
        raise UserError(
            f"load={path}: no such file; give the policy.zip an earlier sfw rl run saved, or its out directory"
        )
    return found


def load_agent(cfg: RLConfig):
    """The SB3 agent saved at ``cfg.load``, loaded as ``cfg.algo`` on the CPU."""
    from stable_baselines3 import PPO, SAC

    path = _policy_file(str(cfg.load))
    try:
        return {"ppo": PPO, "sac": SAC}[cfg.algo].load(path, device="cpu")
    except Exception as err:  # SB3 raises several types for a file of another algorithm or no policy
        raise UserError(
            f"load={cfg.load} does not load as a {cfg.algo} agent ({type(err).__name__}: {err}); "
            "set algo= to the algorithm it was trained with (ppo or sac)"
        ) from err


def _report(cfg: RLConfig, wm, agent, out: Path, training: dict | None, policy_file: str) -> dict[str, Any]:
    """Evaluate ``agent`` in the real env; writes report.json, report.md, the plots and videos."""
    rows, videos = evaluate(cfg, agent, wm, out)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "device", "load")}
    settings["policy"] = cfg.resolved_policy
    settings["eval_steps"] = cfg.real_steps  # resolved: the real episodes' length
    report = {
        "env": wm.meta.get("env"),
        "model": str(cfg.ckpt),
        "history": wm.history,
        "settings": settings,
        "training": training,
        "arms": summarise(cfg, rows),
        "policy_minus_random": paired_gain(rows),
        "policy_file": policy_file,
        "trained_here": training is not None,
        "tensorboard": str(out / "tb") if cfg.tensorboard and training is not None else None,
        "videos": videos,
    }
    report["plots"] = write_rl_plots(report, out)
    report["summary_text"] = rl_summary(report)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "report.md").write_text(rl_markdown(report))
    return report


def _ci(mean: float, low: float, high: float) -> str:
    if math.isnan(low):
        return f"{mean:.2f}"
    return f"{mean:.2f} [{low:.2f}, {high:.2f}]"


def _origin(report: dict) -> str:
    """How the evaluated policy came to be: trained here (steps, envs, time) or loaded from a file."""
    s, t = report["settings"], report["training"]
    if t is None:
        return f"{s['algo']} ({s['policy']} on {s['observation']}) loaded from {report['policy_file']}"
    return (
        f"{s['algo']} ({s['policy']} on {s['observation']}) trained {t['agent_steps']} steps in imagination "
        f"({s['envs']} envs, horizon {s['horizon']}) in {t['seconds']:.0f} s ({t['steps_per_s']:.0f} steps/s)"
    )


def rl_summary(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"{_origin(report)}; evaluated over {next(iter(report['arms'].values()))['episodes']} real episodes of "
        f"{s['eval_steps']} steps in {report['env']}:"
    ]
    longer = s["eval_steps"] != s["horizon"]
    for arm, e in report["arms"].items():
        text = f"  {arm:<7} real return {_ci(e['return_mean'], e['return_low'], e['return_high'])}"
        if longer:
            text += (
                f" (first {s['horizon']} steps: "
                f"{_ci(e['return_at_horizon_mean'], e['return_at_horizon_low'], e['return_at_horizon_high'])})"
            )
        lines.append(
            text
            + f", imagined {_ci(e['imagined_return_mean'], e['imagined_return_low'], e['imagined_return_high'])}"
        )
    g = report["policy_minus_random"]
    lines.append(f"  policy minus random on the same starts: {_ci(g['mean'], g['low'], g['high'])}")
    return "\n".join(lines)


def rl_markdown(report: dict) -> str:
    s, t = report["settings"], report["training"]
    if t is None:
        origin = f"{s['algo']} with {s['policy']} on {s['observation']}, loaded from {report['policy_file']}."
    else:
        origin = (
            f"{s['algo']} with {s['policy']} on {s['observation']}, {t['agent_steps']} agent steps in {s['envs']} "
            f"dream envs (horizon {s['horizon']}, {s['sampler_steps']} sampler step(s), starts: {s['start']}), "
            f"{t['seconds']:.0f} s ({t['steps_per_s']:.0f} steps/s), {t['imagined_episodes']} imagined episodes, "
            f"seed {s['seed']}."
        )
    lines = [
        f"# RL in imagination: {s['algo']} in {report['env']}",
        "",
        f"Model {report['model']}; {origin}",
        "",
        "Evaluation: the same seeds for every arm; each episode starts from the env's reset and "
        f"{max(0, report.get('history', 2) - 1)} mid-range step(s) and runs {s['eval_steps']} agent steps "
        f"(or until the env ends it). Imagined: the same arm in the dream env from the same start, "
        f"{s['horizon']} steps; real return over those first {s['horizon']} steps beside it.",
        "",
        f"| arm | episodes | real return | 95% CI | real, first {s['horizon']} steps | imagined return | 95% CI |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, e in report["arms"].items():
        lines.append(
            f"| {arm} | {e['episodes']} | {e['return_mean']:.2f} | [{e['return_low']:.2f}, {e['return_high']:.2f}] | "
            f"{e['return_at_horizon_mean']:.2f} | {e['imagined_return_mean']:.2f} | "
            f"[{e['imagined_return_low']:.2f}, {e['imagined_return_high']:.2f}] |"
        )
    g = report["policy_minus_random"]
    lines += [
        "",
        f"Policy minus random, episode by episode on the same starts: {_ci(g['mean'], g['low'], g['high'])}.",
    ]
    if t is not None and t["imagined_return_last_100"] is not None:
        lines += [
            "",
            f"Imagined return in training: {t['imagined_return_first_100']:.2f} over the first 100 episodes, "
            f"{t['imagined_return_last_100']:.2f} over the last 100.",
        ]
    files = ["policy.zip"] if t is not None else []
    files += [Path(v).name for v in report.get("videos", [])] + report.get("plots", [])
    lines += ["", "Files: " + ", ".join(files) + (", tb/ (TensorBoard)" if report.get("tensorboard") else "")]
    return "\n".join(lines) + "\n"


def write_rl_plots(report: dict, out: Path) -> list[str]:
    """``returns.png``: real and imagined returns per arm (95% CI), and the imagined training curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curve) = plt.subplots(1, 2, figsize=(9, 3.2))
    arms = list(report["arms"])
    x = np.arange(len(arms))
    s = report["settings"]
    series = [("return", f"real, {s['eval_steps']} steps", "tab:blue")]
    if s["eval_steps"] != s["horizon"]:  # the real return over the imagined episode's length beside it
        series.append(("return_at_horizon", f"real, first {s['horizon']} steps", "tab:cyan"))
    series.append(("imagined_return", f"imagined, {s['horizon']} steps", "tab:orange"))
    width = 0.8 / len(series)
    for i, (key, name, color) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        vals, err = [], [[], []]
        for arm in arms:
            e = report["arms"][arm]
            mean = e[f"{key}_mean"]
            vals.append(mean)
            for side, bound in enumerate((e[f"{key}_low"], e[f"{key}_high"])):
                err[side].append(0.0 if math.isnan(bound) else abs(bound - mean))
        bars.bar(x + offset, vals, width=width, yerr=err, capsize=4, color=color, label=name)
    bars.set_xticks(x, arms)
    bars.set_ylabel("episode return")
    bars.set_title("evaluation in the real env and in imagination (95% CI)")
    bars.legend(fontsize="small")
    points = report["training"]["curve"] if report["training"] is not None else []
    if points:
        curve.plot([p[0] for p in points], [p[1] for p in points], ".", alpha=0.4, color="tab:orange")
    elif report["training"] is None:
        curve.text(0.5, 0.5, "policy loaded, not trained in this run", ha="center", transform=curve.transAxes)
        curve.set_xticks([])
        curve.set_yticks([])
    curve.set_xlabel("agent steps")
    curve.set_ylabel("imagined episode return")
    curve.set_title("training in imagination")
    fig.tight_layout()
    fig.savefig(out / "returns.png", dpi=120)
    plt.close(fig)
    return ["returns.png"]
