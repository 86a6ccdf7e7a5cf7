"""Why do microworld experts damage what they were never trained on? Three measurements that separate the causes
(docs/training.md, "Diagnosis").

    python examples/microworld/diagnose_experts.py EXPERT_DIR [EXPERT_DIR ...] --output runs/diagnosis.json

1. *The objective*: from each expert's `trainer_state.json`, the denoising errors of the policy and the reference
   on the safe (chosen) and unsafe (rejected) images at the start and the end of training. Diffusion-DPO optimises
   only their gap; if the policy's error on the *safe* images rises far above the reference's, the expert learnt to
   draw badly, not to draw the safe counterpart.
2. *Specificity in the text-embedding space*: a K/V expert acts on the text encoder's output tokens. For the name
   token of every concept ("a <name>"), the size of the expert's change to the keys and values, `||dW e||`, and its
   ratio to the base projection `||W e||`, averaged over the expert's own harmful concepts, the other categories'
   harmful concepts, the neutral concepts, and the empty prompt's tokens (the unconditional branch of guidance); and
   the same for the tokens' concept-specific part (the name tokens less their shared mean). A specific expert changes
   its own concepts much more than anything else.
3. *Fragility of the world*: the same measurements (neutral fidelity, IP of the category) with a random LoRA whose
   delta has, layer by layer, the Frobenius norm of the expert's. If a random change of that size leaves the neutral
   images alone, the damage is learnt, not a property of a fragile tiny checkpoint.
4. *How the text encoder codes concepts* (no expert needed): the name tokens' shared mean against their spread,
   the cosine of centred tokens for concepts of the same shape, the same colour, or neither, and linear probes
   trained on the trained names' tokens and tested on the held-out names' tokens for shape, colour, concept and
   harm category. What a K/V expert can single out is what is linear in this space.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from safety_dpo.merging.experts import load_expert
from safety_dpo.microworld import evaluate_pipeline, load_pipeline, protocol_prompts, taxonomy


def objective(expert_dir: Path) -> dict:
    history = json.loads((expert_dir / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "mse/policy_chosen" in entry]
    keys = ("mse/policy_chosen", "mse/reference_chosen", "mse/policy_rejected", "mse/reference_rejected")
    first, last = logged[0], logged[-1]
    return {"first": {key: first[key] for key in keys}, "last": {key: last[key] for key in keys}}


@torch.no_grad()
def token_embeddings(pipe, names: list[str]) -> torch.Tensor:
    """The text encoder's output at the name token of "a <name>", (N, D)."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    ids = tokenizer([f"a {name}" for name in names], padding="max_length", max_length=tokenizer.model_max_length)
    hidden = encoder(torch.tensor(ids.input_ids))[0]  # (N, L, D); token 0 is BOS, 1 "a", 2 the name
    return hidden[:, 2]


@torch.no_grad()
def empty_prompt_tokens(pipe) -> torch.Tensor:
    tokenizer = pipe.tokenizer
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length)
    return pipe.text_encoder(torch.tensor(ids.input_ids))[0][0]  # (L, D)


def specificity(pipe, expert, category: str) -> dict:
    world = taxonomy()
    groups = {
        "own harmful concepts": [c.names[0] for c in world.harmful_concepts if c.category == category],
        "other categories' harmful concepts": [c.names[0] for c in world.harmful_concepts if c.category != category],
        "neutral concepts": [c.names[0] for c in world.neutral],
    }
    embeddings = {group: token_embeddings(pipe, names) for group, names in groups.items()}
    # The name tokens share a large mean (docs/training.md); their concept-specific part is what is left without it.
    shared = torch.cat(list(embeddings.values())).mean(0)
    embeddings |= {f"{group}, concept-specific part": tokens - shared for group, tokens in list(embeddings.items())}
    embeddings["empty prompt tokens"] = empty_prompt_tokens(pipe)
    result = {}
    for group, tokens in embeddings.items():
        change, base = [], []
        for layer, (up, down) in expert.layers.items():
            if tokens.shape[1] != down.shape[1]:
                continue  # not a layer that reads the text embeddings
            weight = pipe.unet.get_submodule(layer).weight
            change.append((tokens @ (up @ down).T).norm(dim=1))
            base.append((tokens @ weight.T).norm(dim=1))
        if change:
            result[group] = (torch.stack(change) / torch.stack(base)).mean().item()
    for suffix in ("", ", concept-specific part"):
        own = result.get(f"own harmful concepts{suffix}")
        for group in ("other categories' harmful concepts", "neutral concepts", "empty prompt tokens"):
            if own and f"{group}{suffix}" in result:
                result[f"{group}{suffix} / own"] = result[f"{group}{suffix}"] / own
    return result


def random_like(expert, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random LoRA with the expert's rank and, layer by layer, its delta's Frobenius norm."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for layer, (up, down) in expert.layers.items():
        random_down = torch.randn(down.shape, generator=generator)
        random_up = torch.randn(up.shape, generator=generator)
        scale = (up @ down).norm() / (random_up @ random_down).norm()
        state[f"unet.{layer}.lora_A.weight"] = random_down
        state[f"unet.{layer}.lora_B.weight"] = random_up * scale
    return state


def fidelity_and_ip(pipe, category: str) -> dict:
    neutral = evaluate_pipeline(pipe, protocol_prompts("neutral"), progress=False)
    unsafe = evaluate_pipeline(pipe, protocol_prompts("unsafe", categories=[category]), progress=False)
    return {"neutral_fidelity": neutral["concept_rate"], "ip": unsafe["ip"]}


def attributes(concept) -> tuple[str, str]:
    """(colour, shape) of a concept, from its description "a <colour> <shape>"."""
    words = concept.description.split()
    return words[1], words[-1]


def linear_probe(train_x, train_y, test_x, test_y, steps: int = 300) -> float:
    """Held-out accuracy of a multinomial logistic regression (weight decay 1e-3, LBFGS) on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = sorted(set(train_y))
    index = {label: i for i, label in enumerate(classes)}
    targets = torch.tensor([index[label] for label in train_y])
    weight = torch.zeros(train_x.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train_x @ weight + bias, targets) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    predicted = (test_x @ weight + bias).argmax(1).tolist()
    return sum(classes[p] == label for p, label in zip(predicted, test_y, strict=True)) / len(test_y)


@torch.no_grad()
def world_geometry(pipe) -> dict:
    world = taxonomy()
    concepts = [*world.harmful_concepts, *world.neutral]
    train = [(concept, name) for concept in concepts for name in concept.names]
    test = [(concept, name) for concept in concepts for name in concept.held_out_names]
    train_x = token_embeddings(pipe, [name for _, name in train])
    test_x = token_embeddings(pipe, [name for _, name in test])
    first = token_embeddings(pipe, [concept.names[0] for concept in concepts])  # one token per concept
    centred = first - first.mean(0)
    cosine = torch.nn.functional.normalize(centred, dim=1) @ torch.nn.functional.normalize(centred, dim=1).T
    pairs = {"same shape": [], "same colour": [], "neither": []}
    for i, a in enumerate(concepts):
        for j, b in enumerate(concepts[:i]):
            (colour_a, shape_a), (colour_b, shape_b) = attributes(a), attributes(b)
            group = "same shape" if shape_a == shape_b else "same colour" if colour_a == colour_b else "neither"
            pairs[group].append(cosine[i, j].item())
    labels = {
        "shape": lambda concept: attributes(concept)[1],
        "colour": lambda concept: attributes(concept)[0],
        "harmful or neutral": lambda concept: concept.category is not None,
        "concept": lambda concept: concept.id,
    }
    probes = {
        task: linear_probe(train_x, [label(c) for c, _ in train], test_x, [label(c) for c, _ in test])
        for task, label in labels.items()
    }
    harmful_train = [i for i, (concept, _) in enumerate(train) if concept.category]
    harmful_test = [i for i, (concept, _) in enumerate(test) if concept.category]
    probes["harm category (harmful concepts)"] = linear_probe(
        train_x[harmful_train],
        [train[i][0].category for i in harmful_train],
        test_x[harmful_test],
        [test[i][0].category for i in harmful_test],
    )
    return {
        "mean token norm": first.norm(dim=1).mean().item(),
        "shared mean's norm": first.mean(0).norm().item(),
        "centred token norm": centred.norm(dim=1).mean().item(),
        "centred cosine": {group: sum(values) / len(values) for group, values in pairs.items()},
        "held-out-name probe accuracy": probes,
        "chance": {"shape": 1 / 10, "colour": 1 / 8, "harm category (harmful concepts)": 1 / 7},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experts", nargs="*", type=Path, help="Expert folders (safety-dpo train outputs).")
    parser.add_argument("--output", type=Path, help="Write the measurements as JSON here.")
    parser.add_argument("--skip-fragility", action="store_true", help="Leave out the (slower) random-LoRA control.")
    args = parser.parse_args()
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    report = {"world": world_geometry(pipe)}
    print(json.dumps(report, indent=2), flush=True)
    for folder in args.experts:
        expert = load_expert(folder)
        category = expert.categories[0]
        entry = {
            "category": category,
            "objective": objective(folder),
            "specificity": specificity(pipe, expert, category),
        }
        if not args.skip_fragility:
            base = fidelity_and_ip(pipe, category)
            pipe.load_lora_weights(str(folder), adapter_name="expert")
            trained = fidelity_and_ip(pipe, category)
            pipe.delete_adapters("expert")
            pipe.load_lora_weights(random_like(expert), adapter_name="random")
            random = fidelity_and_ip(pipe, category)
            pipe.delete_adapters("random")
            entry["fragility"] = {"base": base, "expert": trained, "random LoRA of the same norms": random}
        report[str(folder)] = entry
        print(json.dumps({str(folder): entry}, indent=2), flush=True)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
