"""Asking an OpenAI-compatible chat endpoint what a feature's highlighted images (or marked text
contexts) share: temperature 0, retries with backoff, "unable" read as no explanation."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx

from .highlight import data_url

# the paper's instruction, in substance, in our words
IMAGES_INSTRUCTION = (
    "In each image, only the highlighted regions matter; everything else is darkened. Say in a short noun "
    "phrase what the highlighted regions of all the images have in common. Describe only what you see, "
    "without interpreting it. If the highlights are minimal or share nothing, answer: unable.")
# per-image mode asks what the scenes model was trained to answer about a highlighted region
REGION_QUESTION = "What does the highlighted region show?"
TEXT_INSTRUCTION = (
    "In each passage below, one word or word piece is marked between « and ». Say in a short noun phrase "
    "what the marked words have in common, considering their contexts. If they share nothing, answer: unable.")
RETRY_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)


class ExplainerError(RuntimeError):
    pass


@dataclass
class ExplainerConfig:
    url: str  # .../v1
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0
    retries: int = 4
    backoff_s: float = 1.0
    max_tokens: int = 40


def clean(answer: str) -> str | None:
    """The explanation in ``answer``, or None when the explainer said it was unable."""
    text = " ".join(answer.strip().strip("\"'`").split()).rstrip(".")
    if not text or re.match(r"^(i am |i'm )?unable(?=$|[\s.,;:!])", text.lower()):
        return None
    return text


def combine(answers: list[str | None]) -> str | None:
    """Per-image answers -> one explanation: the answer at least half of them give, else the words at
    least half of them use (in the order the first such answer has them); None when nothing is shared."""
    given = [a for a in answers if a]
    if not given or len(given) * 2 < len(answers):
        return None
    norm = [a.lower() for a in given]
    top, count = Counter(norm).most_common(1)[0]
    if count * 2 >= len(answers):
        return given[norm.index(top)]
    votes = Counter(w for a in norm for w in set(a.split()))
    shared = [w for w in norm[0].split() if votes[w] * 2 >= len(answers) and w not in ("a", "an", "the")]
    return " ".join(dict.fromkeys(shared)) or None


class Explainer:
    def __init__(self, cfg: ExplainerConfig, transport: httpx.BaseTransport | None = None, sleep=time.sleep) -> None:
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self.cfg = cfg
        self.http = httpx.Client(base_url=cfg.url.rstrip("/"), headers=headers, timeout=cfg.timeout_s,
                                 transport=transport)
        self.sleep = sleep
        self.stats = Counter()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.http.close()

    def _count(self, **kw) -> None:
        with self._lock:
            self.stats.update(kw)

    def ask(self, content: list[dict]) -> str:
        """One chat completion's text; retries timeouts, connection errors and retryable statuses."""
        body = {"model": self.cfg.model, "temperature": 0, "max_tokens": self.cfg.max_tokens,
                "messages": [{"role": "user", "content": content}]}
        for attempt in range(self.cfg.retries + 1):
            self._count(requests=1)
            delay = self.cfg.backoff_s * 2 ** attempt
            try:
                r = self.http.post("/chat/completions", json=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                error = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    try:
                        reply = r.json()
                        text = reply["choices"][0]["message"]["content"]
                        if not isinstance(text, str):
                            raise TypeError("content is not text")
                    except (ValueError, KeyError, IndexError, TypeError) as e:
                        raise ExplainerError(f"malformed answer ({type(e).__name__}: {e}): {r.text[:200]}") from None
                    usage = reply.get("usage") or {}
                    self._count(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                                completion_tokens=int(usage.get("completion_tokens") or 0))
                    return text
                error = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code not in RETRY_STATUS:
                    raise ExplainerError(error)
                after = r.headers.get("Retry-After", "")
                if after.replace(".", "", 1).isdigit():
                    delay = max(delay, float(after))
            if attempt < self.cfg.retries:
                self._count(retries=1)
                self.sleep(delay)
        raise ExplainerError(f"gave up after {self.cfg.retries + 1} attempts: {error}")

    def explain_images(self, images, per_image: bool = False) -> str | None:
        """``images``: highlighted PIL images. Together (the paper): one request with all of them;
        per image (small explainers): one request each, answers combined."""
        if per_image:
            return combine([clean(self.ask([{"type": "image_url", "image_url": {"url": data_url(im)}},
                                            {"type": "text", "text": REGION_QUESTION}])) for im in images])
        parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
        return clean(self.ask([*parts, {"type": "text", "text": IMAGES_INSTRUCTION}]))

    def explain_text(self, contexts: list[str]) -> str | None:
        passages = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(contexts))
        return clean(self.ask([{"type": "text", "text": f"{TEXT_INSTRUCTION}\n\n{passages}"}]))
