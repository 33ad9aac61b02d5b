"""The typed arguments of the tandem Serve application (`args:` in deploy/*.yaml).

Every field has a default and a description; a wrong field, type or value fails the deploy with
a message naming it. `serve deploy` passes the yaml's `args` mapping to `tandem.cluster.app:build_app`,
which validates it here before anything starts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tandem import models
from tandem.params import Mode


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    id: str = Field("tandem-tiny", description="model name shown by ListModels and /v1/models")
    target: str = Field(models.TINY_TARGET, description="local folder of the verifier checkpoint, or tandem:<name> for "
                        "one shipped in the package (default: the tiny pair); relative paths are resolved against "
                        "the directory the app is built in")
    draft: str = Field(models.TINY_DRAFT, description="local folder of the drafter checkpoint (same tokenizer)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights and activations")
    engine: Literal["auto", "native", "hf"] = Field("auto", description="native: batched Llama-family engine")
    max_context: int | None = Field(None, ge=16, description="cap on tokens per sequence (default: the model's)")
    exact: bool = Field(False, description="the verifier's logits for a position are the same bits whatever else the "
                        "step computes (other requests, draft length, graph bucket): greedy output then never depends "
                        "on mode, batch or load, also in bf16; every matmul runs at one shape, attention at one tile "
                        "shape (native engine only; costs some speed, BENCHMARKS.md)")

    @field_validator("target", "draft")
    @classmethod
    def _checkpoint_exists(cls, path: str) -> str:
        if not (models.resolve(path) / "config.json").is_file():
            raise ValueError(f"no checkpoint at {path!r} (a folder with config.json is required; nothing is downloaded)")
        return path

    def target_config(self) -> dict:
        return json.loads((models.resolve(self.target) / "config.json").read_text())


class LaneConfig(_Strict):
    tensor_parallel_size: int = Field(1, ge=1, description="verifier ranks; must divide the target's attention and KV heads")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where verifier and drafter run")
    max_batch_size: int = Field(8, ge=1, le=1024, description="requests decoded together (KV slots per lane)")
    max_queued: int = Field(32, ge=0, description="requests waiting per lane before RESOURCE_EXHAUSTED")
    verifier_gpus: float = Field(0.0, ge=0, description="GPUs per verifier rank (1 on GPU clusters)")
    drafter_gpus: float = Field(0.0, ge=0, description="GPUs for the drafter (a fraction shares a GPU)")
    num_drafters: int = Field(1, ge=1, le=8, description="drafter processes per lane, each in its own bundle "
                              "(drafter_gpus / drafter_resources each); a request drafts on one of them, so "
                              "several draft a step's batch in parallel")
    cuda_graphs_at_start: bool = Field(False, description="capture the CUDA graphs of every batch bucket up to "
                                       "max_batch_size (forwards; draft windows up to max(speculation.max_draft, 8) "
                                       "steps) before the lane serves, as vLLM does, instead of when a shape is first "
                                       "used; a request asking for a longer window still captures its own. Start-up "
                                       "takes longer and the memory is taken at once: each sampled draft window keeps "
                                       "[batch, steps, vocab] fp32 buffers per attention-span bucket, GBs for a 128k "
                                       "vocabulary at large batch or context. Native engine only; the verifier has no "
                                       "graphs at tensor_parallel_size > 1 (its drafters still capture theirs)")
    colocate_drafter: bool = Field(False, description="run the drafter inside verifier rank 0's process, on its "
                                   "device (one-GPU lanes: no per-step exchange; PEARL overlaps on a second CUDA "
                                   "stream). The lane then has no drafter bundle: leave drafter_gpus and "
                                   "drafter_resources unset")
    verifier_cpus: float = Field(1.0, gt=0, description="CPUs per verifier rank")
    drafter_cpus: float = Field(0.5, gt=0, description="CPUs for the drafter")
    verifier_resources: dict[str, float] = Field(default_factory=dict, description='custom Ray resources per verifier rank, e.g. {"large_gpu": 1}')
    drafter_resources: dict[str, float] = Field(default_factory=dict, description='custom Ray resources for the drafter, e.g. {"small_gpu": 1}')
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field("PACK", description="how a lane's bundles spread over nodes")
    core_process: bool = Field(False, description="run the lane's step loop (verifier rank 0) in a process of its "
                               "own, as vLLM's engine core, so that the replica's event loop and streams do not "
                               "compete with it for the interpreter (false: a thread of the replica). Not yet "
                               "measured on a GPU; on a 2-core CPU it costs 5-8% at one stream")
    stream_batching_interval_ms: float = Field(50.0, ge=0, le=1000, description="the router streams a request's first "
                                               "token at once, later ones at most once per this many ms, batched (Ray Serve "
                                               "LLM's stream_batching_interval_ms; 0: a chunk per step). Each chunk costs "
                                               "the router's interpreter and the client a message")


class SpeculationConfig(_Strict):
    mode: Mode = Field("sd", description="default decoding mode: sd (draft max_draft, then verify), pearl (draft "
                       "beside the verify), ar (the target alone), or auto (experimental: the lane chooses SD or "
                       "PEARL and, every step, each request's draft length; it does not yet beat a fixed length "
                       "on a GPU, BENCHMARKS.md)")
    max_draft: int = Field(5, ge=0, le=64, description="default SD draft length / PEARL window (auto: the longest "
                           "length the lane may choose)")
    adaedl: bool = Field(False, description="entropy-based early draft stop by default (AdaEDL; with a fixed "
                         "max_draft of 5 the plain draft is faster on one H200, BENCHMARKS.md)")
    adaedl_lambda0: float = Field(0.5, gt=0, lt=1, description="AdaEDL's initial threshold λ0")
    adaedl_stop: Literal["cost", "paper"] = Field("cost", description="cost: end a draft where one more token no "
                                                  "longer pays for itself; paper: AdaEDL's threshold λ")
    adaedl_cost_ratio: float | None = Field(None, gt=0, description="c = (step time + drafting's fixed part) / "
                                            "one more draft token's time, for the cost stop (default: measured online)")
    send_draft_probs: bool = Field(True, description="send q with drafts (False: one-hot drafts)")
    load_control: bool = Field(False, description="also choose the draft lengths of requests that name a mode "
                               "(sd, pearl), as for auto ones: every few steps the lane picks the lengths that "
                               "maximize its predicted tokens/s from step times it fits online (0: speculation off "
                               "while the batch is compute-bound; tandem/spec/load_control.py). A request's "
                               "max_draft stays its ceiling")


class GrpcConfig(_Strict):
    """tandem's own gRPC server (tandem.v1.Tandem), run by the Router replica; Serve's gRPC proxy is
    not used (it listens on every interface, without TLS, and accepts 2 GB messages)."""

    enabled: bool = Field(True, description="serve gRPC at all (HTTP goes through Serve's proxy, http_options)")
    host: str = Field("127.0.0.1", description="address to listen on: 127.0.0.1 (this machine only) or 0.0.0.0 / [::] "
                      "(every interface; set TANDEM_API_KEYS and TLS then)")
    port: int = Field(9000, ge=1, le=65535, description="port to listen on")
    tls_cert_file: str | None = Field(None, description="PEM certificate chain: with tls_key_file, gRPC is served over TLS")
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file")
    reflection: bool = Field(False, description="answer the gRPC reflection service (lets tools list the API)")

    @model_validator(mode="after")
    def _tls_pair(self) -> "GrpcConfig":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("grpc.tls_cert_file and grpc.tls_key_file go together: give both or neither")
        for path in (self.tls_cert_file, self.tls_key_file):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"grpc TLS file {path!r} does not exist")
        return self


class LimitsConfig(_Strict):
    max_request_bytes: int = Field(1 << 20, ge=1024, description="largest gRPC message / HTTP body accepted, checked "
                                   "before it is decoded (RESOURCE_EXHAUSTED / 413 beyond)")
    max_prompt_chars: int = Field(200_000, ge=1, description="longest prompt in characters, checked before tokenizing")


class AppConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    lane: LaneConfig = Field(default_factory=LaneConfig)
    speculation: SpeculationConfig = Field(default_factory=SpeculationConfig)
    grpc: GrpcConfig = Field(default_factory=GrpcConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    num_lanes: int = Field(1, ge=1, description="lane replicas (ignored when autoscaling is set)")
    autoscaling: dict[str, int | float] | None = Field(None, description="Serve autoscaling_config for lanes, e.g. {min_replicas: 1, max_replicas: 4}")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens when a request leaves it 0")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    request_timeout_s: float = Field(300.0, gt=0, description="a request still running after this is cancelled")

    @model_validator(mode="after")
    def _tp_divides_heads(self) -> "AppConfig":
        cfg = self.model.target_config()
        tp = self.lane.tensor_parallel_size
        heads = cfg.get("num_attention_heads", 1)
        kv = cfg.get("num_key_value_heads", heads)
        if heads % tp or kv % tp:
            raise ValueError(
                f"lane.tensor_parallel_size={tp} must divide the target's num_attention_heads={heads} "
                f"and num_key_value_heads={kv}"
            )
        lane = self.lane
        if lane.colocate_drafter and lane.num_drafters > 1:
            raise ValueError("lane.colocate_drafter puts one drafter in verifier rank 0's process: "
                             "lane.num_drafters must be 1 with it")
        if lane.colocate_drafter and (lane.drafter_gpus or lane.drafter_resources):
            raise ValueError("lane.colocate_drafter runs the drafter in verifier rank 0's process, on its GPU: "
                             "leave lane.drafter_gpus and lane.drafter_resources unset")
        if tp > 1 and self.model.engine == "hf":
            raise ValueError("lane.tensor_parallel_size > 1 needs model.engine 'native' or 'auto' (Llama family)")
        if self.model.exact and (self.model.engine == "hf" or cfg.get("model_type") not in models.NATIVE_MODEL_TYPES):
            raise ValueError(f"model.exact needs the native engine: a Llama-family target {models.NATIVE_MODEL_TYPES} "
                             f"and model.engine 'native' or 'auto' (the target is {cfg.get('model_type')!r})")
        if self.model.exact and models.rope_type(cfg) in models.BATCH_DEPENDENT_ROPE:
            raise ValueError(f"model.exact cannot run the target's {models.rope_type(cfg)!r} RoPE: its angles follow "
                             "the longest sequence in the batch")
        return self
