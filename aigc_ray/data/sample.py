"""The sample corpus: customer-support questions and their best answers, made by our own code.

Questions vary in wording; the answer depends on the product and the topic only, so a model
that learns the structure predicts answers far better than it did before fine-tuning.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from aigc_ray.errors import ConfigError

PRODUCTS = {
    "Nimbus Drive": "the Nimbus app",
    "Acme Router X2": "the Acme Home app",
    "Orbit Watch": "the Orbit companion app",
    "Pulse Earbuds": "the Pulse Sound app",
    "Vega Laptop": "Vega Control Center",
    "Harbor Bank card": "Harbor online banking",
}

# topic: (question wordings, answer template)
TOPICS = {
    "password": (
        ["How do I reset my password for {p}?", "I forgot my {p} password.",
         "Can't log in to {p}, how do I change my password?", "Password reset for {p} please."],
        "Open {app}, choose Sign in, then Forgot password. We email a reset link that works "
        "for 30 minutes. Pick a new password of at least 12 characters.",
    ),
    "refund": (
        ["I want a refund for my {p}.", "How do I get my money back for {p}?",
         "Can I return my {p} for a refund?", "Refund request: {p}."],
        "You can return {p} within 30 days. Start the return in {app} under Orders, print the "
        "label, and the refund reaches your card 5 to 7 days after we receive it.",
    ),
    "shipping": (
        ["Where is my {p} order?", "My {p} has not arrived yet.",
         "How long does shipping take for {p}?", "Track my {p} delivery."],
        "Orders of {p} ship within 2 business days. The tracking number is in {app} under "
        "Orders. If it shows delivered but you have nothing, tell us within 14 days.",
    ),
    "cancel": (
        ["How do I cancel my {p} subscription?", "Stop billing me for {p}.",
         "I want to cancel {p}.", "Cancel plan for {p}."],
        "Go to {app}, open Account, then Subscription, and choose Cancel. You keep access to "
        "{p} until the end of the paid period and are not charged again.",
    ),
    "billing": (
        ["How do I update my card for {p}?", "Change payment method on {p}.",
         "My {p} payment failed.", "Update billing details for {p}."],
        "In {app}, open Account, then Billing, and choose Update card. If a payment failed, "
        "we retry it within 24 hours after you save the new card.",
    ),
    "damaged": (
        ["My {p} arrived damaged.", "{p} came broken in the box.",
         "The {p} I received is cracked.", "Damaged {p} on delivery."],
        "We are sorry. Send a photo of the damaged {p} through {app} under Orders, then Report "
        "a problem. We ship a replacement the same day at no cost.",
    ),
    "two_factor": (
        ["How do I turn on two-factor login for {p}?", "Enable 2FA on {p}.",
         "Set up two-step verification for {p}.", "Secure my {p} account with a code."],
        "Open {app}, choose Security, then Two-factor login. Scan the code with an "
        "authenticator app and save the backup codes somewhere safe.",
    ),
    "locked": (
        ["My {p} account is locked.", "{p} says my account is suspended.",
         "Locked out of {p}.", "Why is my {p} account blocked?"],
        "Accounts lock after 5 failed sign-ins. Wait 15 minutes, or reset your password in "
        "{app} to unlock {p} at once.",
    ),
}

OPENERS = ["", "Hi, ", "Hello, ", "Hey there. ", "Good morning. ", "Quick question: "]
CLOSERS = ["", " Thanks!", " Thank you.", " Please help.", " Any advice?"]


def make_pairs(num_pairs: int, seed: int = 0) -> list[dict]:
    """`num_pairs` prompt/completion dicts, the same for the same seed."""
    rng = random.Random(seed)
    products, topics = list(PRODUCTS), list(TOPICS)
    pairs = []
    for index in range(num_pairs):
        product, topic = rng.choice(products), rng.choice(topics)
        wordings, answer = TOPICS[topic]
        question = rng.choice(OPENERS) + rng.choice(wordings).format(p=product) + rng.choice(CLOSERS)
        pairs.append({
            "id": index,
            "topic": topic,
            "prompt": f"Customer: {question}\nAgent:",
            "completion": " " + answer.format(p=product, app=PRODUCTS[product]),
        })
    return pairs


THANKS = ["Thanks!", "Great, thank you.", "That worked, thanks.", "Perfect."]
FAREWELL = "You are welcome. Is there anything else I can help you with on {p}?"
SYSTEM = "You are the support agent for {p}. Answer in a few exact steps."


def make_conversations(num_conversations: int, seed: int = 0) -> list[dict]:
    """`num_conversations` multi-turn support chats in OpenAI messages form: one to three
    questions about one product, answered as in the pairs, sometimes a system message first and
    a thank-you at the end. Their lengths vary, as real support chats do."""
    rng = random.Random(seed)
    products, topics = list(PRODUCTS), list(TOPICS)
    chats = []
    for index in range(num_conversations):
        product = rng.choice(products)
        app = PRODUCTS[product]
        messages = [{"role": "system", "content": SYSTEM.format(p=product)}] \
            if rng.random() < 0.5 else []
        for topic in rng.sample(topics, rng.choice((1, 1, 2, 3))):
            wordings, answer = TOPICS[topic]
            question = (rng.choice(OPENERS) + rng.choice(wordings).format(p=product)
                        + rng.choice(CLOSERS))
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer.format(p=product, app=app)}]
        if rng.random() < 0.3:
            messages += [{"role": "user", "content": rng.choice(THANKS)},
                         {"role": "assistant", "content": FAREWELL.format(p=product)}]
        chats.append({"id": index, "messages": messages})
    return chats


# lm-evaluation-harness tasks over support questions (`aigc-ray eval --harness`), one
# of each kind of request it makes: multiple choice (the right answer among three from other
# topics; log-likelihoods), a rolling log-likelihood (perplexity), and the greedy reply (exact
# match; generation with stop strings). The data files are named by absolute path, so the YAMLs work
# from any folder, with `aigc-ray eval --harness` and with plain `lm_eval` alike.
HARNESS_DOCS = 200
CHOICE_TASK = """task: support_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
TEXT_TASK = """task: support_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


REPLY_TASK = """task: support_reply
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: completion
generation_kwargs:
  until: ["\\n", "Customer:"]
  max_gen_toks: 64
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ["^ +", " +$"]
metadata:
  version: 1.0
"""


def make_choice_docs(num_docs: int, seed: int) -> list[dict]:
    """Held-out questions, each with its answer among three answers to other topics (same
    product), the right one at a seeded position."""
    rng = random.Random(seed)
    docs = []
    for pair in make_pairs(num_docs, seed):
        product = next(p for p in PRODUCTS if p in pair["prompt"])
        others = rng.sample([t for t in TOPICS if t != pair["topic"]], 3)
        wrong = [" " + TOPICS[t][1].format(p=product, app=PRODUCTS[product]) for t in others]
        answer = rng.randrange(4)
        choices = wrong[:answer] + [pair["completion"]] + wrong[answer:]
        docs.append({"prompt": pair["prompt"], "choices": choices, "answer": answer})
    return docs


def write_harness_tasks(out: Path, seed: int) -> dict:
    """The task YAMLs and their JSONL files in `out`; {'choice', 'text', 'reply': yaml path}."""
    out.mkdir(parents=True, exist_ok=True)
    # Drawn with other seeds than the corpus, but its wordings are few: about half of these
    # questions also occur in the default 4,000-pair corpus word for word. The tasks show what
    # a model learned of the support answers, not how it generalizes.
    other = seed + 1_000_003
    docs = {"choice": make_choice_docs(HARNESS_DOCS, other),
            "text": [{"text": (p["prompt"] + p["completion"]).replace("\n", " ")}
                     for p in make_pairs(HARNESS_DOCS // 2, other + 1)],
            "reply": [{"prompt": p["prompt"], "completion": p["completion"]}
                      for p in make_pairs(HARNESS_DOCS // 2, other + 2)]}
    written = {}
    for name, template in (("choice", CHOICE_TASK), ("text", TEXT_TASK),
                           ("reply", REPLY_TASK)):
        data = out / f"support_{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs[name]))
        yaml_file = out / f"support_{name}.yaml"
        yaml_file.write_text(template.format(data=json.dumps(str(data.resolve()))))
        written[name] = str(yaml_file)
    return written


def write_sample_corpus(out_dir: str | Path, num_pairs: int = 4000, seed: int = 0) -> dict:
    """Write `support.jsonl` (prompt/completion pairs), `support.txt` (one document a line),
    `support_chat.jsonl` (as many multi-turn conversations, OpenAI messages), and two
    lm-evaluation-harness tasks on support questions under `harness/`."""
    if num_pairs < 1:
        raise ConfigError(f"--pairs must be at least 1, got {num_pairs}")
    out = Path(out_dir)
    pairs = make_pairs(num_pairs, seed)
    jsonl, text, chat = out / "support.jsonl", out / "support.txt", out / "support_chat.jsonl"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with jsonl.open("w") as f:
            for pair in pairs:
                f.write(json.dumps(pair) + "\n")
        with text.open("w") as f:
            for pair in pairs:
                f.write((pair["prompt"] + pair["completion"]).replace("\n", " ") + "\n")
        with chat.open("w") as f:
            for conversation in make_conversations(num_pairs, seed):
                f.write(json.dumps(conversation) + "\n")
        tasks = write_harness_tasks(out / "harness", seed)
    except OSError as exc:  # DIR is a file, or a folder we may not write to
        raise ConfigError(f"cannot write the sample corpus to {out_dir}: "
                          f"{exc.strerror or exc}; pass a folder you can write to") from None
    return {"jsonl": str(jsonl), "text": str(text), "chat": str(chat), "pairs": len(pairs),
            "harness": tasks}
