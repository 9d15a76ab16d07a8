"""SAP (safety-aware probing): a probe on the hidden states makes the unsafe direction of the LoRA weights costly.

    python -m defenses.sap [--triples F] [--rho R] [--probe-lr LR] [--layers 3,8] [--safety-batch N] \
                           -- <surgery.py flags>

The probe v is a bias added to the hidden state after the MLP of a few decoder layers (zero-initialised; the
released code puts it in mlp.down_proj's bias, the same thing). Every optimizer step of the LoRA loop:

  1. g = gradient w.r.t. the LoRA weights theta of the contrastive safety loss on a batch of safety triples,
         -log sigmoid(log p(refusal | x) - log p(harmful answer | x)),
     log p summed over the answer tokens with the whole prompt + answer as input (the released code feeds the
     prompt-only ids against full-sequence labels, with no shift: the losses it contrasts are not those). The
     gradient is taken of a positively rescaled loss with the same direction that does not underflow
     (rescaled_contrastive_loss);
  2. delta = rho * ||theta|| * g / ||g||: a step towards the unsafe side (g increases the safety loss);
  3. the probe's gradients of the task loss at theta + delta and at theta (theta restored exactly after);
  4. v steps UP their difference: v <- Adam_maximize(grad_v L(theta + delta) - grad_v L(theta)), i.e. v ascends
     L(theta + delta, v) - L(theta, v) ~ delta . grad_theta L. With that probe in place the task gradient
     leans towards delta, so the descent step moves away from the unsafe side and lowers the safety loss;
  5. the loop steps the LoRA weights on the task loss with the probe applied.

Sign and optimizer follow the released code (SAP_code/train.py): it back-propagates -L(theta + delta) and then
+L(theta) into v, sets v to zero and takes one AdamW step at lr 0.05, so v is a fresh one-step probe every step
(Adam keeps its moment estimates). A plain gradient step would barely move v: the difference of step 3 scales
with rho = 2e-5 (about 1e-8..1e-7 per coordinate on the tiny test model, near Adam's eps = 1e-8, which therefore
shortens the first step of the smallest coordinates below lr). Here v is likewise reset and stepped from zero
each step (Adam with maximize=True), and it is zeroed again once the loop has taken its task gradient, so the
exported model and the loop's sink report carry no probe: v shapes training only.

Layers: the released code probes layers 3 and 9 of 32 (Llama-2-7B); the default scales those depths to the
model (SmolLM2's 30 layers: 3 and 8). Cost per step: one forward/backward of the safety batch (two sequences a
triple) and two of the task batch, on top of the loop's own.
"""
import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

import surgery
from defenses import load_triples, loop_parser, run_in_loop
from common import UserError

RELEASED_LAYERS, RELEASED_DEPTH = (3, 9), 32
MAX_SAFETY_BATCH = 1024  # triples per step (two sequences each): surgery.py's bound of --ref-batch


def default_probe_layers(n_layers):
    """The released probe layers (3 and 9 of 32) at the same relative depths of this model."""
    return sorted({min(n_layers - 1, round(layer * n_layers / RELEASED_DEPTH)) for layer in RELEASED_LAYERS})


def answer_logprobs(model, batch):
    """log p(answer | prompt) per sequence: summed over the answer tokens, the full prompt + answer as input."""
    targets = batch["labels"][:, 1:]
    predicts_answer = F.pad(targets != -100, (0, 1))  # position t predicts token t + 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=predicts_answer).logits  # [answer tokens, vocab], in (sequence, position) order
    answer = targets != -100
    token_logprobs = logits.float().log_softmax(-1).gather(1, targets[answer][:, None]).squeeze(1)
    sequence = torch.arange(len(targets), device=targets.device)[:, None].expand_as(targets)[answer]
    return torch.zeros(len(targets), device=logits.device).index_add(0, sequence, token_logprobs)


def contrastive_safety_loss(safe_logprobs, harmful_logprobs):
    """-log sigmoid(log p(safe) - log p(harmful)), averaged over the triples: low when refusing is likelier."""
    return -F.logsigmoid(safe_logprobs - harmful_logprobs).mean()


def rescaled_contrastive_loss(margins):
    """A loss whose gradient is the contrastive loss's gradient divided by a positive number, so it has the same
    direction g / ||g||, which is all that delta uses. margins: log p(safe) - log p(harmful) per triple.

    The contrastive loss's gradient is -sigmoid(-m_i) grad m_i / n. With log-probs summed over a long harmful
    answer the margin easily passes 100 nats, where sigmoid(-m) underflows to exactly 0 in fp32: g = 0, delta = 0,
    and SAP would silently be SFT. Weighting by sigmoid(-m_i) / max_j sigmoid(-m_j), computed in log space, keeps
    the relative weights and loses nothing to underflow (the max is over every rank's triples)."""
    log_weights = F.logsigmoid(-margins.detach().float())
    largest = log_weights.max()
    if dist.is_initialized():
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return -((log_weights - largest).exp() * margins).sum() / len(margins)


def unsafe_perturbation(params, grads, rho):
    """delta = rho * ||theta|| * g / ||g|| over all the tensors together (zero where g = 0)."""
    g_norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
    theta_norm = torch.sqrt(sum((p.detach().float() ** 2).sum() for p in params))
    scale = rho * theta_norm / g_norm if g_norm > 0 else torch.zeros(())
    return [(scale * g).to(g.dtype) for g in grads]


def probe_gradients(loss, probe):
    """d loss / d v for each probe vector (zero where the loss does not reach it, e.g. an empty rank share)."""
    if not torch.is_tensor(loss) or not loss.requires_grad:
        return [torch.zeros_like(v) for v in probe]
    grads = torch.autograd.grad(loss, probe, allow_unused=True)
    return [torch.zeros_like(v) if g is None else g for v, g in zip(probe, grads)]


class SafetyProbe:
    """The probe vectors v and their optimizer; `step` is steps 1-4 of the module docstring."""

    def __init__(self, vectors, lr, rho):
        self.vectors, self.rho = vectors, rho
        self.optimizer = torch.optim.Adam(vectors, lr=lr, maximize=True)

    @contextlib.contextmanager
    def differentiable(self):
        for v in self.vectors:
            v.requires_grad_(True)
        try:
            yield
        finally:
            for v in self.vectors:
                v.requires_grad_(False)

    def reset(self):
        with torch.no_grad():
            for v in self.vectors:
                v.zero_()

    def step(self, params, safety_margins, task_loss, before_each_pass=lambda: None):
        """safety_margins(): log p(safe) - log p(harmful) per triple, and task_loss(): closures over the current
        weights; before_each_pass() runs before the two task passes (the caller resets the dropout seed there, so
        both see the same masks). Returns the contrastive safety loss and the difference of the probe gradients."""
        self.reset()  # the probe is a fresh step from zero (the released code's zero_params)
        margins = safety_margins()
        grads = list(torch.autograd.grad(rescaled_contrastive_loss(margins), params))
        if dist.is_initialized():  # the safety batch of the step is the union of the ranks' draws
            for g in grads:
                dist.all_reduce(g)
        delta = unsafe_perturbation(params, grads, self.rho)
        saved = [p.detach().clone() for p in params]
        with self.differentiable():
            with torch.no_grad():
                for p, d in zip(params, delta):
                    p.add_(d)
            before_each_pass()
            at_unsafe = probe_gradients(task_loss(), self.vectors)
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)  # exactly theta again, not theta + delta - delta
            before_each_pass()
            here = probe_gradients(task_loss(), self.vectors)
        difference = [u - h for u, h in zip(at_unsafe, here)]
        if dist.is_initialized():  # each rank's task loss is its share of the global batch's
            for d in difference:
                dist.all_reduce(d)
        for v, d in zip(self.vectors, difference):
            v.grad = d
        self.optimizer.step()  # maximize=True: v moves up the difference
        for v in self.vectors:
            v.grad = None
        return -F.logsigmoid(margins.detach()).mean(), difference


class SAP(surgery.Defense):
    """SAP in surgery.py's loop. triples: (instruction, refusal, harmful answer) dicts (None: the offline ones);
    rho: perturbation radius relative to ||theta||; probe_lr: the probe's Adam learning rate; layers: decoder
    layers whose MLP output gets the probe (None: the released depths); safety_batch: triples per step."""

    def __init__(self, triples=None, rho=2e-5, probe_lr=0.05, layers=None, safety_batch=4):
        if not 0 < rho < math.inf or not 0 < probe_lr < math.inf or safety_batch < 1:
            raise UserError("SAP: rho and the probe learning rate must be > 0 and the safety batch at least 1")
        if safety_batch > MAX_SAFETY_BATCH:
            raise UserError(f"SAP: the safety batch must be at most {MAX_SAFETY_BATCH:,} triples, got {safety_batch:,}")
        self.triples = load_triples() if triples is None else triples
        self.rho, self.probe_lr, self.layers, self.safety_batch = rho, probe_lr, layers, safety_batch
        self.last_safety_loss = None

    def setup(self, model, tokenizer, args):
        self.args, self.pad_id = args, tokenizer.pad_token_id
        self.lora = [p for p in model.parameters() if p.requires_grad]
        encoded = [tuple(surgery.encode(tokenizer, {"instruction": t["instruction"], "output": t[answer]},
                                        args.max_len) for answer in ("refusal", "harmful_answer"))
                   for t in self.triples]
        # A triple whose answers fall beyond --max-len has nothing to contrast.
        self.pairs = [pair for pair in encoded if all(any(label != -100 for label in labels[1:])
                                                      for _, labels in pair)]
        if not self.pairs:
            raise UserError(f"SAP: no safety triple has answer tokens within --max-len {args.max_len}")
        decoder_layers = model.get_submodule("model.layers")
        self.layers = self.layers if self.layers is not None else default_probe_layers(len(decoder_layers))
        if not self.layers or not all(0 <= layer < len(decoder_layers) for layer in self.layers):
            raise UserError(f"SAP: probe layers must be in 0..{len(decoder_layers) - 1}, got {self.layers}")
        hidden = model.config.hidden_size
        self.probe = SafetyProbe([torch.zeros(hidden, device=model.device) for _ in self.layers],
                                 self.probe_lr, self.rho)
        for layer, v in zip(self.layers, self.probe.vectors):
            decoder_layers[layer].mlp.register_forward_hook(
                lambda module, inputs, output, v=v: output + v.to(output.dtype))

    def safety_batch_for(self, step):
        rank = dist.get_rank() if dist.is_initialized() else 0
        draw = torch.Generator().manual_seed(surgery.step_seed(self.args, step, rank))
        picks = torch.randperm(len(self.pairs), generator=draw)[:self.safety_batch].tolist()
        sequences = [self.pairs[i][0] for i in picks] + [self.pairs[i][1] for i in picks]  # safe ones, then harmful
        return surgery.to_device(surgery.pad_batch([ids for ids, _ in sequences], self.pad_id,
                                                   [labels for _, labels in sequences]), self.lora[0].device)

    def before_step(self, model, step, task_loss):
        batch = self.safety_batch_for(step)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if model.device.type == "cuda"
                    else contextlib.nullcontext())

        def safety_margins():
            with autocast:
                logprobs = answer_logprobs(model, batch)
            safe, harmful = logprobs.chunk(2)
            return safe - harmful

        # The probe's passes draw their own dropout masks (the same for theta + delta and theta) and leave the
        # loop's random stream as it was.
        seed = surgery.step_seed(self.args, step, dist.get_rank() if dist.is_initialized() else 0) + 1
        with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
            torch.manual_seed(seed)
            self.last_safety_loss, _ = self.probe.step(self.lora, safety_margins, task_loss,
                                                      before_each_pass=lambda: torch.manual_seed(seed))

    def after_step(self, model, step):
        # The probe has shaped this step's gradient; it is removed, so nothing after training (the sink report,
        # the exported model) sees it.
        self.probe.reset()

    def state_dict(self):
        # The probe itself restarts from zero every step; its Adam moments carry over, so a resumed run needs them.
        return {"probe_optimizer": self.probe.optimizer.state_dict()}

    def load_state_dict(self, state):
        if "probe_optimizer" in state:
            self.probe.optimizer.load_state_dict(state["probe_optimizer"])


def layer_list(text):
    """"3,8" -> [3, 8] (argparse reports a ValueError as an invalid value, exit 2)."""
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None):
    parser = loop_parser(
        "python -m defenses.sap",
        "SAP: LoRA fine-tuning with a safety-aware probe on the hidden states, stepped each step by the "
        "difference of the task loss's probe gradients at theta + delta (towards unsafe) and at theta "
        "(docs/METHOD.md section 3).",
        epilog="Released-code settings: --lora-targets q_proj,v_proj --lora-rank 8 --lora-alpha 8 --lora-dropout 0.1 "
               "--lr 1e-4.")
    parser.add_argument("--triples", help="JSON/JSONL (instruction, refusal, harmful_answer) records "
                                          "(default: offline.safety_triples, harmful_ref with refusals)")
    parser.add_argument("--rho", type=float, default=2e-5, help="perturbation radius: ||delta|| = rho * ||theta||")
    parser.add_argument("--probe-lr", type=float, default=0.05, help="Adam learning rate of the probe")
    parser.add_argument("--layers", type=layer_list,
                        help="comma-separated decoder layers that get the probe (default: layers 3 and 9 of 32 "
                             "scaled to the model's depth)")
    parser.add_argument("--safety-batch", type=int, default=4, help="safety triples per step (2 sequences each)")

    def make(a):
        triples = load_triples(a.triples)
        return SAP(triples, a.rho, a.probe_lr, a.layers, a.safety_batch)
    return run_in_loop("defenses.sap", parser, make, argv, inputs=lambda a: [("--triples", a.triples)])


if __name__ == "__main__":
    main()
