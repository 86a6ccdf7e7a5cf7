"""UCE: Unified Concept Editing (Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024).

UCE erases a concept by editing, in closed form, every cross-attention key and value projection of the UNet
(`attn2.to_k`, `attn2.to_v`) so that the erased text's token embeddings c_i produce what the guide text's tokens
produced before, v_i* = W_old c_i^guide, while preserved texts' tokens c_j keep their outputs (paper Eq. 7):

    W* = (lamb W_old + s_e sum_i v_i* c_i^T + s_p sum_j W_old c_j c_j^T) (lamb I + s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T)^-1

The edit W* - W_old = W_old s_e (C_guide - C)^T C M^-1 (rows of C: the c's; M: the inverted factor) has rank at
most the number of erased tokens, and all but W_old is shared by every layer (`uce_edit_basis`), so it is saved
exactly as a diffusers-format LoRA (`saving.py`) that `pipe.load_safety_adapter` and stock `pipe.load_lora_weights`
read.

What the official code (github.com/rohitgandikota/unified-concept-editing) does, and what is taken from it:

- The WACV-era script, `train-scripts/train_erase.py` at commit bd5fb51 (removed in 4502388), the script released
  with the paper:
    - L190-194: edits `to_v` and, with `with_to_k=True` (L172, the default), `to_k` of every `attn2`.
    - L234-237, L286-287, L309-312: mat1 = lamb W + s_e sum v* c^T + s_p sum W c c^T,
      mat2 = lamb I + s_e sum c c^T + s_p sum c c^T, W* = mat1 mat2^-1. The lamb terms are not in the paper's Eq. 7;
      they keep mat2 invertible and W* near W_old.
    - L277-280: the default technique "replace" (L324) targets v* = W_old c^guide.
    - L253-260 (tokens): each erased text contributes its tokens from its last token before the end-of-text token
      (index `attention_mask.sum() - 2`) to the end of the padded sequence; its guide's tokens are taken the same
      way, and the longer run is cut at the end so both have the same length: erase token i_e + k is paired with guide
      token i_g + k. Here this is `token_selection="last_token_to_end"`.
    - L289-298: preserved texts contribute all their tokens, each mapped to its own old output.
    - L215-216, L390-391: with no guide, the guide is " " ("towards_uncond"), which CLIP tokenises exactly as the
      empty prompt "" (start and end tokens only, so i_g = 0, the start token).
    - L422: the empty prompt "" is always preserved, before any given preserve texts (`preserve_empty_prompt`).
    - L427-428: preserve_scale defaults to max(0.1, 1 / number of preserved texts, "" included).
    - L442 and L329: lamb = 0.5, erase_scale = 1.
    - L353: the unsafe-content list ('i2g'): hate, harassment, violence, suffering, humiliation, harm, suicide,
      sexual, nudity, bodily fluids, blood. The README (commit b66412e, L42) moderates unsafe content with
      `--concepts 'violence, nudity, harm' --concept_type 'unsafe'`: no guide (the empty prompt) and no preserve
      texts, so only "" is preserved, with preserve_scale = max(0.1, 1/1) = 1. `data/info/universal-nudity-towards_
      uncond-...` (commit 80bb915) names the nudity edit: "nudity" towards the empty prompt.
- The current script, `trainscripts/uce_sd_erase.py` (commit 28c81ed): the same closed form (L56-82, solved with an
  explicit float32 inverse, L82), `attn2` `to_k`/`to_v` (L18), but one token per text: the last one before the
  end-of-text token (L34-42; the start token for ""), no automatic "" preservation, and defaults erase_scale = 1,
  preserve_scale = 1, lamb = 0.5 (L105-107), guide "" ("art" for styles, L136-141). Here this is
  `token_selection="last_token"`. (Its README's `--concept_type 'unsafe'` is not among its argparse choices, L100.)

Defaults here follow the WACV-era script, the one released with the paper: lamb 0.5, erase_scale 1,
preserve_scale max(0.1, 1/n), tokens from the last one to the end, "" preserved, guide "". The solve is done in
float64 with `torch.linalg.solve` rather than a float32 inverse: the same W*, computed more accurately.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from safety_dpo.baselines.saving import baseline_metadata, is_finished, write_lora_adapter

TokenSelection = Literal["last_token_to_end", "last_token"]
TOKEN_SELECTIONS = ("last_token_to_end", "last_token")
TARGETS = ("to_k", "to_v")
_ENCODE_BATCH = 64  # prompts per text-encoder call: bounds memory for long prompt lists


# ---------------------------------------------------------------------------------------------------- the maths
def _check_edit_inputs(
    weight: torch.Tensor, erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor, scales: dict[str, float]
) -> None:
    if weight.ndim != 2:
        raise ValueError(f"weight must be a matrix (out, d); got shape {tuple(weight.shape)}.")
    d = weight.shape[1]
    for name, embeddings in (("erase", erase), ("guide", guide), ("preserve", preserve)):
        if embeddings.ndim != 2 or embeddings.shape[1] != d:
            raise ValueError(
                f"{name}_embeddings must be (n, {d}) to match weight {tuple(weight.shape)}; "
                f"got {tuple(embeddings.shape)}."
            )
    if erase.shape != guide.shape:
        raise ValueError(
            f"erase_embeddings {tuple(erase.shape)} and guide_embeddings {tuple(guide.shape)} must pair row by row."
        )
    for name, value in scales.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0; got {value!r}.")


def _normal_matrix(
    erase: torch.Tensor, preserve: torch.Tensor, lamb: float, erase_scale: float, preserve_scale: float
) -> torch.Tensor:
    """M = lamb I + s_e C C^T + s_p C_p C_p^T (d, d) in float64, the right-hand factor of Eq. 7 (train_erase.py
    L237, L287, L310); rows of `erase` and `preserve` are the c's."""
    erase, preserve = erase.double(), preserve.double()
    identity = torch.eye(erase.shape[1], dtype=torch.float64, device=erase.device)
    return lamb * identity + erase_scale * erase.T @ erase + preserve_scale * preserve.T @ preserve


def uce_closed_form(
    weight: torch.Tensor,
    erase_embeddings: torch.Tensor,
    guide_embeddings: torch.Tensor,
    preserve_embeddings: torch.Tensor,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
) -> torch.Tensor:
    """UCE's edited projection W* (paper Eq. 7 with the code's lamb regulariser, train_erase.py L234-312).

    W* minimises
        lamb ||W - W_old||_F^2 + erase_scale sum_i ||W c_i - W_old c_i^guide||^2 + preserve_scale sum_j ||W c_j - W_old c_j||^2
    and is W* = (lamb W_old + s_e sum_i v_i* c_i^T + s_p sum_j W_old c_j c_j^T) M^-1 with v_i* = W_old c_i^guide and
    M = lamb I + s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T, solved in float64 (`torch.linalg.solve`, no inverse).

    Args:
        weight: W_old, (out, d).
        erase_embeddings: The c_i, one per row, (n, d).
        guide_embeddings: The c_i^guide paired with them, (n, d).
        preserve_embeddings: The c_j, (m, d); m may be 0.
        lamb: Weight of staying near W_old, > 0 unless the c's span R^d.
        erase_scale: s_e.
        preserve_scale: s_p.

    Returns:
        W*, (out, d), float64.

    Raises:
        ValueError: If the shapes do not fit together or a scale is negative or not finite.
    """
    scales = {"lamb": lamb, "erase_scale": erase_scale, "preserve_scale": preserve_scale}
    _check_edit_inputs(weight, erase_embeddings, guide_embeddings, preserve_embeddings, scales)
    w_old = weight.double()
    erase, guide, preserve = erase_embeddings.double(), guide_embeddings.double(), preserve_embeddings.double()
    targets = lamb * w_old + erase_scale * (w_old @ guide.T) @ erase + preserve_scale * (w_old @ preserve.T) @ preserve
    normal = _normal_matrix(erase, preserve, lamb, erase_scale, preserve_scale)
    return torch.linalg.solve(normal, targets.T).T  # W* M = targets, M symmetric


def exact_low_rank_factors(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewrite `up @ down` as an equal product of rank r = min(up's rows, inner size, down's columns).

    QR of both factors, then an SVD of the small core, with sqrt(S) on each side so both factors have the same scale;
    no singular value is dropped, so the product is unchanged up to float64 rounding.

    Args:
        up: (out, n).
        down: (n, d).

    Returns:
        (up (out, r), down (r, d)), float64.
    """
    q_up, r_up = torch.linalg.qr(up.double())  # (out, k1), (k1, n)
    q_down, r_down = torch.linalg.qr(down.double().T)  # (d, k2), (k2, n)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)  # (k1, r), (r,), (r, k2)
    root = s.sqrt()
    return (q_up @ u) * root, (root[:, None] * vh) @ q_down.T


def uce_edit_basis(
    erase_embeddings: torch.Tensor,
    guide_embeddings: torch.Tensor,
    preserve_embeddings: torch.Tensor,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer-independent part of UCE's edit: (left (d, r), right (r, d)), r = min(n, d), with
    W* - W_old = W_old @ left @ right for every projection W_old that reads these embeddings.

    From W* M = lamb W_old + s_e W_old C_g^T C + s_p W_old C_p^T C_p and W_old M = lamb W_old + s_e W_old C^T C +
    s_p W_old C_p^T C_p (rows of C, C_g, C_p are the c's): (W* - W_old) M = s_e W_old (C_g - C)^T C, so
    W* - W_old = W_old [s_e (C_g - C)^T] [C M^-1], of rank at most n.

    Args: as `uce_closed_form`, without the weight.

    Returns:
        (left, right), float64.
    """
    erase, guide = erase_embeddings.double(), guide_embeddings.double()
    normal = _normal_matrix(erase, preserve_embeddings, lamb, erase_scale, preserve_scale)
    right = torch.linalg.solve(normal, erase.T).T  # C M^-1, (n, d)
    return exact_low_rank_factors(erase_scale * (guide - erase).T, right)


def uce_delta_factors(
    weight: torch.Tensor,
    erase_embeddings: torch.Tensor,
    guide_embeddings: torch.Tensor,
    preserve_embeddings: torch.Tensor,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LoRA factors of UCE's edit of one projection: up @ down = W* - W_old (`uce_closed_form`), which is
    s_e (V* - W_old C^T) C M^-1 in the paper's column notation (see `uce_edit_basis`).

    Args: as `uce_closed_form`.

    Returns:
        (up (out, r), down (r, d)), float64, r = min(n, out, d).

    Raises:
        ValueError: As `uce_closed_form`.
    """
    scales = {"lamb": lamb, "erase_scale": erase_scale, "preserve_scale": preserve_scale}
    _check_edit_inputs(weight, erase_embeddings, guide_embeddings, preserve_embeddings, scales)
    left, right = uce_edit_basis(
        erase_embeddings, guide_embeddings, preserve_embeddings, lamb, erase_scale, preserve_scale
    )
    return exact_low_rank_factors(weight.double() @ left, right)


# ------------------------------------------------------------------------------------------------------ config
@dataclass
class UCEConfig:
    """UCE's settings; the defaults are the official WACV-era code's (module docstring).

    Parameters:
        lamb: Weight of staying near the old projection (train_erase.py L442: 0.5).
        erase_scale: Weight of the erase terms (train_erase.py L329, uce_sd_erase.py L105: 1).
        preserve_scale: Weight of the preserve terms; None: max(0.1, 1 / number of preserved texts), "" included
            (train_erase.py L427-428).
        token_selection: "last_token_to_end": each erased text's tokens from its last token to the end, aligned with
            its guide's, and all tokens of preserved texts (train_erase.py L253-298); "last_token": the last token
            before end-of-text of every text (uce_sd_erase.py L34-42).
        preserve_empty_prompt: Preserve the empty prompt "" as well, as train_erase.py L422 does; it keeps the
            unconditional branch of classifier-free guidance close to the old model.
        targets: Which cross-attention projections to edit (train_erase.py L190-194: to_v and to_k).
        guide_prompt: Every erased text's guide when no guides are given ("", the empty prompt, train_erase.py L391).
    """

    lamb: float = field(default=0.5, metadata={"help": "Weight of staying near the old projection."})
    erase_scale: float = field(default=1.0, metadata={"help": "Weight of the erase terms."})
    preserve_scale: float | None = field(
        default=None, metadata={"help": "Weight of the preserve terms; None: max(0.1, 1 / number of preserved texts)."}
    )
    token_selection: TokenSelection = field(
        default="last_token_to_end", metadata={"help": f"Which tokens of each text are edited: {TOKEN_SELECTIONS}."}
    )
    preserve_empty_prompt: bool = field(default=True, metadata={"help": 'Also preserve the empty prompt "".'})
    targets: list[str] = field(
        default_factory=lambda: list(TARGETS), metadata={"help": "attn2 projections to edit: to_k and/or to_v."}
    )
    guide_prompt: str = field(default="", metadata={"help": "The guide of every erased text when none are given."})

    def __post_init__(self) -> None:
        for name in ("lamb", "erase_scale"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(f"UCEConfig.{name} must be a finite number > 0; got {value!r}.")
        scale = self.preserve_scale
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0
        ):
            raise ValueError(
                f"UCEConfig.preserve_scale must be None (max(0.1, 1 / number of preserved texts)) or a finite number "
                f">= 0; got {scale!r}."
            )
        if self.token_selection not in TOKEN_SELECTIONS:
            raise ValueError(
                f"UCEConfig.token_selection must be one of {TOKEN_SELECTIONS}; got {self.token_selection!r}."
            )
        if not isinstance(self.preserve_empty_prompt, bool):
            raise ValueError(
                f"UCEConfig.preserve_empty_prompt must be True or False; got {self.preserve_empty_prompt!r}."
            )
        targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        if not targets or any(target not in TARGETS for target in targets) or len(set(targets)) != len(targets):
            raise ValueError(
                f"UCEConfig.targets must be a non-empty list of distinct names from {list(TARGETS)}; "
                f"got {self.targets!r}."
            )
        self.targets = targets
        if not isinstance(self.guide_prompt, str):
            raise ValueError(
                f'UCEConfig.guide_prompt must be a string ("": the empty prompt); got {self.guide_prompt!r}.'
            )

    def resolved_preserve_scale(self, num_preserved: int) -> float:
        """`preserve_scale`, or the official default for `num_preserved` texts (train_erase.py L427-428)."""
        if self.preserve_scale is not None:
            return float(self.preserve_scale)
        return max(0.1, 1.0 / max(1, num_preserved))

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-native values (lists, not tuples)."""
        return {**asdict(self), "targets": list(self.targets)}


# ------------------------------------------------------------------------------------------- tokens and layers
def last_token_positions(tokenizer: Any, prompts: Sequence[str]) -> list[int]:
    """Each prompt's last token before its end-of-text token, `attention_mask.sum() - 2` as train_erase.py L253 and
    uce_sd_erase.py L34-39 compute it: 0 (the start token) for the empty prompt."""
    encoded = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
    return [int(sum(mask)) - 2 for mask in encoded.attention_mask]


def aligned_token_indices(
    erase_position: int, guide_position: int, length: int, token_selection: TokenSelection
) -> tuple[list[int], list[int]]:
    """Which tokens of an erased text and of its guide are paired.

    "last_token_to_end" (train_erase.py L253-260): from each one's last token, as many as the later start leaves
    before `length`, so erase token `erase_position + k` is paired with guide token `guide_position + k`.
    "last_token" (uce_sd_erase.py L42): the last tokens only.
    """
    if token_selection == "last_token":
        return [erase_position], [guide_position]
    count = length - max(erase_position, guide_position)
    return list(range(erase_position, erase_position + count)), list(range(guide_position, guide_position + count))


@torch.no_grad()
def uce_embeddings(
    components: Any,
    erase_prompts: Sequence[str],
    guide_prompts: Sequence[str],
    preserve_prompts: Sequence[str],
    token_selection: TokenSelection,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The c's UCE edits with: what the UNet's cross-attention reads (`encode_prompts`: SD's last hidden state,
    SDXL's two encoders side by side), at the tokens `token_selection` picks.

    Token positions come from the first tokenizer, as uce_sd_erase.py L34 does for SDXL too (both CLIP tokenizers
    split a text alike).

    Returns:
        (erase (n, D), guide (n, D), preserve (m, D)), float64 on the CPU.
    """
    from safety_dpo.trainer.components import encode_prompts

    unique = list(dict.fromkeys([*erase_prompts, *guide_prompts, *preserve_prompts]))
    hidden = torch.cat(
        [
            encode_prompts(components, unique[start : start + _ENCODE_BATCH])["prompt_embeds"].double().cpu()
            for start in range(0, len(unique), _ENCODE_BATCH)
        ]
    )  # (N, L, D)
    positions = dict(zip(unique, last_token_positions(components.tokenizers[0], unique), strict=True))
    rows = {prompt: row for row, prompt in enumerate(unique)}
    length = hidden.shape[1]
    erase, guide = [], []
    for erase_prompt, guide_prompt in zip(erase_prompts, guide_prompts, strict=True):
        erase_index, guide_index = aligned_token_indices(
            positions[erase_prompt], positions[guide_prompt], length, token_selection
        )
        erase.append(hidden[rows[erase_prompt], erase_index])
        guide.append(hidden[rows[guide_prompt], guide_index])
    preserve = [
        hidden[rows[prompt]] if token_selection == "last_token_to_end" else hidden[rows[prompt], [positions[prompt]]]
        for prompt in preserve_prompts
    ]
    empty = hidden.new_zeros(0, hidden.shape[2])
    return torch.cat(erase), torch.cat(guide), torch.cat(preserve) if preserve else empty


def cross_attention_projections(unet: Any, targets: Sequence[str] = TARGETS) -> dict[str, torch.nn.Linear]:
    """The UNet's cross-attention projections UCE edits (`attn2.to_k` / `attn2.to_v`, uce_sd_erase.py L17-20), by
    module name; a layer wrapped by another LoRA gives its base layer.

    Raises:
        ValueError: If the UNet has none.
    """
    found = {}
    for name, module in unet.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] == "attn2" and parts[-1] in targets:
            module = getattr(module, "base_layer", module)
            if isinstance(module, torch.nn.Linear):
                found[name] = module
    if not found:
        raise ValueError(f"The UNet has no cross-attention projections attn2.{{{','.join(targets)}}} for UCE to edit.")
    return found


# -------------------------------------------------------------------------------------------------- the edit
def _checked_prompts(
    erase_prompts: Sequence[str], guide_prompts: Sequence[str] | None, preserve_prompts: Sequence[str], default: str
) -> tuple[list[str], list[str], list[str]]:
    for name, prompts in (("erase_prompts", erase_prompts), ("preserve_prompts", preserve_prompts)):
        if isinstance(prompts, str):
            raise ValueError(f"{name} must be a list of prompts, not the string {prompts!r}.")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{name}[{index}] is {prompt!r}; every prompt must be a non-blank string.")
    if not erase_prompts:
        raise ValueError("erase_prompts is empty; give at least one prompt to erase.")
    if guide_prompts is None:
        guides = [default] * len(erase_prompts)
    elif isinstance(guide_prompts, str):
        raise ValueError(
            f"guide_prompts must be a list of prompts (one per erase prompt), not the string {guide_prompts!r}."
        )
    else:
        guides = list(guide_prompts)
        if len(guides) != len(erase_prompts):
            raise ValueError(
                f"guide_prompts has {len(guides)} prompts but erase_prompts has {len(erase_prompts)}; give one guide "
                "per erase prompt, or None for the empty prompt."
            )
        for index, guide in enumerate(guides):
            if not isinstance(guide, str):
                raise ValueError(
                    f'guide_prompts[{index}] is {guide!r}; guides must be strings ("": the empty prompt).'
                )
    return list(erase_prompts), guides, list(preserve_prompts)


def edit_uce(
    erase_prompts: Sequence[str],
    output_dir: str | os.PathLike,
    model: Any = None,
    guide_prompts: Sequence[str] | None = None,
    preserve_prompts: Sequence[str] = (),
    config: UCEConfig | None = None,
    categories: Sequence[str] = (),
    concepts: Sequence[str] = (),
    progress: bool = True,
) -> Path:
    """Erase `erase_prompts` with UCE and save the edit as a safety adapter folder (`saving.py`).

    Args:
        erase_prompts: The texts to erase.
        output_dir: Where the adapter is written; a finished one with the same settings is reused.
        model: None (the microworld), a Stable Diffusion 1.x/2.x or SDXL pipeline, or a path or Hub id of one. A
            pipeline is only read, never changed.
        guide_prompts: One guide per erased text; None: `config.guide_prompt` ("") for each.
        preserve_prompts: Texts whose outputs are kept (with "" too when `config.preserve_empty_prompt`).
        config: The settings (None: `UCEConfig()`).
        categories: Recorded in `safety_dpo.json` and the card.
        concepts: Recorded in `safety_dpo.json` and the card.
        progress: Show a progress bar over the edited layers.

    Returns:
        The adapter folder.

    Raises:
        ValueError: If `erase_prompts` is empty, a prompt is blank or not a string, or guides and erase prompts differ
            in number; or as `load_components`.
        FileExistsError: If `output_dir` holds an adapter made otherwise.
    """
    from safety_dpo.trainer.components import load_components

    # 1. Check inputs, and reuse a finished adapter
    config = config or UCEConfig()
    erase, guides, preserve = _checked_prompts(erase_prompts, guide_prompts, preserve_prompts, config.guide_prompt)
    settings = {**config.to_dict(), "erase_prompts": erase, "guide_prompts": guides, "preserve_prompts": preserve}
    if is_finished(output_dir, "uce", settings):
        return Path(output_dir)

    # 2. The c's, and the edit's layer-independent part
    components = load_components(model)
    preserved = ([""] if config.preserve_empty_prompt else []) + preserve
    erase_embeddings, guide_embeddings, preserve_embeddings = uce_embeddings(
        components, erase, guides, preserved, config.token_selection
    )
    preserve_scale = config.resolved_preserve_scale(len(preserved))
    left, right = uce_edit_basis(
        erase_embeddings, guide_embeddings, preserve_embeddings, config.lamb, config.erase_scale, preserve_scale
    )

    # 3. Each projection's exact LoRA factors: W* - W_old = (W_old left) right
    layers = {}
    projections = cross_attention_projections(components.unet, config.targets)
    for name, module in tqdm(projections.items(), desc="UCE", disable=not progress):
        layers[name] = exact_low_rank_factors(module.weight.detach().to("cpu", torch.float64) @ left, right)

    # 4. Save
    metadata = baseline_metadata(components, "uce", list(categories), list(concepts), settings)
    description = (
        "UCE (Gandikota et al., WACV 2024): a closed-form edit of the UNet's cross-attention "
        f"{'/'.join(config.targets)} "
        f"projections that maps {len(erase)} erased prompts to their guides and preserves {len(preserved)} prompts "
        f"(lamb {config.lamb}, erase_scale {config.erase_scale}, preserve_scale {preserve_scale:g}), saved as a "
        "LoRA that reproduces the edit exactly."
    )
    return write_lora_adapter(output_dir, layers, metadata, description)
