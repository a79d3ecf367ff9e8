"""The teacher client: an OpenAI-compatible chat endpoint behind the call cache.

Any endpoint the official ``openai`` client can reach works (OpenAI, vLLM, llama.cpp's server, Ollama). Every
call is looked up in the ``TeacherCache`` first; a call that is made is stored the moment it returns, whatever
happens to the rest of the run. Retries with backoff (429, 408/409, 5xx, timeouts, dropped connections) are the
``openai`` client's own, bounded by ``EndpointConfig.max_retries``; a call that still fails is stored as an
``error`` record (for inspection; it is made again on the next run) and raised as ``TeacherCallError``.

What the ``openai`` client (3.54) does with a broken 200 reply, which it does not retry:
- a JSON body cut short (well framed): ``json.JSONDecodeError`` from ``response.json()``;
- a body that is not JSON though labelled ``application/json``: ``JSONDecodeError`` or ``UnicodeDecodeError``;
- a body labelled as something else (an HTML error page from a proxy): no error at all, ``create`` returns the
  body as a ``str`` (strict response validation is off by default), so we check the type ourselves;
- a connection dropped mid-body: ``APIConnectionError``, which it does retry.
The first three are retried here (``_request``), with exponential backoff, up to ``max_retries`` times too.

A dead endpoint fails fast: before its first call the client checks that the endpoint answers at all (``GET
/models`` within ``BreakerConfig.probe_timeout_s``, no retry; any HTTP status counts as alive), and after
``BreakerConfig.consecutive_failures`` failed calls in a row it starts no new call (``EndpointDown``).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import openai
from openai.types.chat import ChatCompletion
from tqdm import tqdm

from pipeline.config import BreakerConfig, Budget, EndpointConfig, SamplingConfig
from pipeline.teacher.cache import CallRecord, TeacherCache, call_key, utc_now

Messages = Sequence[Mapping[str, Any]]

# What the openai client is given when the endpoint needs no key (a local server): it refuses an empty key.
NO_KEY = "no-key-needed"


class TeacherConfigError(ValueError):
    """The endpoint cannot be used as configured (e.g. its API key variable is not set)."""


class TeacherCallError(RuntimeError):
    """A call failed after the client's retries; its error record is in the cache. ``cause`` is the last error."""

    def __init__(self, message: str, key: str | None = None, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.cause = cause


class EndpointDown(TeacherCallError):
    """The endpoint does not answer (the probe failed, or too many calls in a row failed): no new call starts.
    Every answer received so far is in the cache, so a re-run pays only for the rest."""


class BudgetExceeded(RuntimeError):
    """The next call would exceed the budget. Every call made so far is in the cache."""

    def __init__(self, message: str, counters: TeacherCounters) -> None:
        super().__init__(message)
        self.counters = counters


@dataclass(frozen=True)
class TeacherCounters:
    calls: int = 0  # calls made to the endpoint that succeeded
    cached: int = 0  # answers served from the cache (or from an identical call earlier in the same batch)
    errors: int = 0  # calls that failed after retries
    unusable: int = 0  # answers that came back but could not be used (empty, or unparseable after retries)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


def budget_refusal(budget: Budget, spent: TeacherCounters, in_flight: int) -> str | None:
    """Why the next call would exceed ``budget`` (None if it would not).

    A call's cost is known only once it returns, so the next one is estimated as the mean of the calls made so
    far, and the calls still in flight are counted at that estimate too. With calls of equal size a budget of
    N calls' worth allows exactly N.

    >>> b = Budget(max_prompt_tokens=35)
    >>> budget_refusal(b, TeacherCounters(calls=2, prompt_tokens=20), in_flight=0) is None
    True
    >>> budget_refusal(b, TeacherCounters(calls=3, prompt_tokens=30), in_flight=0)
    'prompt tokens: 30 spent + 10 estimated for 0 in flight and the next > 35'
    """
    made = max(spent.calls, 1)
    ahead = in_flight + 1
    limits = [
        ("prompt tokens", budget.max_prompt_tokens, spent.prompt_tokens),
        ("completion tokens", budget.max_completion_tokens, spent.completion_tokens),
        ("cost (USD)", budget.max_cost_usd, spent.cost_usd),
    ]
    for name, limit, used in limits:
        if limit is None:
            continue
        estimate = used / made * ahead
        if used >= limit or used + estimate > limit:
            return f"{name}: {used:g} spent + {estimate:g} estimated for {in_flight} in flight and the next > {limit:g}"
    return None


@dataclass(frozen=True)
class CallResult:
    """One answer. ``logprobs``: per generated token, ``{token: logprob}`` over its top alternatives (None when
    log-probabilities were not asked for). ``latency_s`` is the original call's, also when served from the cache."""

    key: str
    text: str
    logprobs: list[dict[str, float]] | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool
    latency_s: float
    finish_reason: str | None = None


def resolve_api_key(api_key_env: str | None) -> str:
    """The key from the environment variable named ``api_key_env``; ``NO_KEY`` when no variable is named."""
    if not api_key_env:
        return NO_KEY
    key = os.environ.get(api_key_env)
    if not key:
        raise TeacherConfigError(
            f"the teacher endpoint's API key is read from the environment variable {api_key_env!r}, which is not "
            f"set (export it, or set api_key_env to null for an endpoint that needs no key)"
        )
    return key


def make_client(endpoint: EndpointConfig, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=endpoint.base_url, api_key=api_key, timeout=endpoint.timeout_s, max_retries=endpoint.max_retries
    )


def stored_logprobs(completion: ChatCompletion) -> list[dict[str, Any]] | None:
    """The reply's per-token log-probabilities as stored: ``[{token, logprob, top_logprobs: [{token, logprob}]}]``
    (the ``bytes`` the API adds are dropped: they repeat the token)."""
    logprobs = completion.choices[0].logprobs
    if logprobs is None or logprobs.content is None:
        return None
    return [
        {
            "token": item.token,
            "logprob": item.logprob,
            "top_logprobs": [{"token": top.token, "logprob": top.logprob} for top in item.top_logprobs or []],
        }
        for item in logprobs.content
    ]


def token_logprobs(stored: list[dict[str, Any]] | None) -> list[dict[str, float]] | None:
    """Per position ``{token: logprob}`` over the top alternatives (the chosen token alone if none were given).

    Two alternatives that decode to one string keep the higher log-probability.

    >>> token_logprobs([{"token": "Yes", "logprob": -0.1, "top_logprobs": [
    ...     {"token": "Yes", "logprob": -0.1}, {"token": "No", "logprob": -2.5}, {"token": "No", "logprob": -9.0}]}])
    [{'Yes': -0.1, 'No': -2.5}]
    """
    if stored is None:
        return None
    positions = []
    for item in stored:
        alternatives = item.get("top_logprobs") or [item]
        position: dict[str, float] = {}
        for alt in alternatives:
            token, logprob = alt["token"], float(alt["logprob"])
            position[token] = max(logprob, position.get(token, float("-inf")))
        positions.append(position)
    return positions


def result_from_record(record: CallRecord, cached: bool) -> CallResult:
    return CallResult(
        key=record.key,
        text=record.response_text or "",
        logprobs=token_logprobs(record.logprobs),
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        cached=cached,
        latency_s=record.latency_s,
        finish_reason=record.finish_reason,
    )


class _BadReply(ValueError):
    """A 200 reply that is not a usable chat completion."""


# What a broken 200 reply raises (see the module docstring): retried here, with backoff.
BROKEN_REPLY = (_BadReply, json.JSONDecodeError, UnicodeDecodeError)


def backoff_seconds(attempt: int, base: float = 0.5, cap: float = 8.0) -> float:
    """The wait before retry ``attempt + 1``: exponential (``base * 2**attempt``, at most ``cap``), with up to 25%
    jitter so that concurrent calls do not retry in step.

    >>> [0.5 <= backoff_seconds(0) <= 0.625, 8.0 <= backoff_seconds(10) <= 10.0]
    [True, True]
    """
    delay = min(base * 2**attempt, cap)
    return delay * (1 + random.random() / 4)


def _check_reply(reply: object) -> ChatCompletion:
    if not isinstance(reply, ChatCompletion):
        preview = str(reply)[:200]
        raise _BadReply(f"the endpoint answered {type(reply).__name__} instead of a chat completion: {preview!r}")
    if not reply.choices:
        raise _BadReply("the chat completion has no choices")
    if reply.choices[0].message.content is None:
        # An empty string is a (deterministic) answer and is kept; None means no text answer at all.
        raise _BadReply(f"the chat completion has no message content (finish_reason={reply.choices[0].finish_reason})")
    return reply


class CachedTeacher:
    """Chat completions through the cache. Thread-safe; ``complete_many`` runs calls concurrently.

    ``template_hash`` identifies the prompt template (and version) the messages come from: part of every key, so
    a changed template never serves answers to the old one. ``run_id`` marks the records this run writes.
    """

    def __init__(
        self,
        endpoint: EndpointConfig,
        sampling: SamplingConfig,
        cache: TeacherCache,
        template_hash: str,
        run_id: str | None = None,
        budget: Budget | None = None,
        progress: bool = True,
        max_unusable_tries: int = 3,
        breaker: BreakerConfig | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.sampling = sampling
        self.cache = cache
        self.template_hash = template_hash
        self.run_id = run_id or f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        self.budget = budget or Budget()
        self.progress = progress
        self.max_unusable_tries = max_unusable_tries
        self.breaker = breaker or BreakerConfig()
        self._consecutive_failures = 0
        self._down: str | None = None  # why the breaker stopped the calls, once it has
        # the key is read (and the client made) when the first call has to be made, so a fully cached run needs
        # no key; it is never stored in a record
        self._api_key: str | None = None
        self._client: openai.OpenAI | None = None
        self._client_lock = threading.Lock()
        self._lock = threading.Lock()
        self._counters = TeacherCounters()
        self._in_flight = 0

    # -- bookkeeping ----------------------------------------------------------------------------------------
    @property
    def counters(self) -> TeacherCounters:
        with self._lock:
            return self._counters

    def _add(self, **deltas: float) -> None:
        with self._lock:
            self._counters = _plus(self._counters, **deltas)

    def _reserve(self) -> None:
        """Admit one more call to the endpoint, or raise ``BudgetExceeded`` (or ``EndpointDown``)."""
        if self._down is not None:
            raise self.endpoint_down()
        with self._lock:
            refusal = budget_refusal(self.budget, self._counters, self._in_flight)
            if refusal is not None:
                raise BudgetExceeded(f"teacher budget reached: {refusal}", self._counters)
            self._in_flight += 1

    def _redact(self, text: str) -> str:
        # An error body may echo the request's Authorization header (a proxy's error page does): never store it.
        return text.replace(self._api_key, "<redacted>") if self._api_key not in (None, NO_KEY) else text

    def _openai(self) -> openai.OpenAI:
        """The endpoint's client, made on the first call that has to be made (the key is read then)."""
        with self._client_lock:
            if self._down is not None:  # a failed probe leaves no client: the next call must not probe again
                raise self.endpoint_down()
            if self._client is None:
                try:
                    self._api_key = resolve_api_key(self.endpoint.api_key_env)
                except TeacherConfigError as err:
                    cached = self.counters.cached
                    raise TeacherConfigError(
                        f"{err}; {cached} answers came from the cache, and the next one has to be asked"
                    ) from None
                client = make_client(self.endpoint, self._api_key)
                self._probe(client)
                self._client = client
            return self._client

    def _probe(self, client: openai.OpenAI) -> None:
        """Fail fast on an endpoint that does not answer: one cheap request, bounded by the probe timeout."""
        try:
            client.with_options(timeout=self.breaker.probe_timeout_s, max_retries=0).models.list()
        except openai.APIStatusError:
            return  # it answered (a server without /models says 404): alive
        except openai.APIError as err:
            self._trip(
                f"{self.endpoint.base_url} did not answer a probe within {self.breaker.probe_timeout_s:g} s "
                f"({type(err).__name__}: {err})"
            )
            raise self.endpoint_down() from err

    def _trip(self, reason: str) -> None:
        with self._lock:
            self._down = self._down or reason

    def endpoint_down(self) -> EndpointDown:
        """The error that stops a run on a dead endpoint: what was done, and what a re-run costs."""
        counters = self.counters
        return EndpointDown(
            f"the teacher endpoint looks down: {self._down}. Stopped calling it; this run paid for "
            f"{counters.calls} calls and served {counters.cached} from the cache, all kept in the cache, so a "
            f"re-run pays only for the rest (teacher.breaker sets when to stop)"
        )

    def mark_unusable(self, key: str, reason: str) -> bool:
        """Record that the answer to ``key`` could not be used (``reason``): a later run asks again, up to
        ``max_unusable_tries`` answers in all. False when there was no usable answer to mark (already unusable)."""
        marked = self.cache.mark_unusable(key, reason, self.run_id)
        if marked:
            self._add(unusable=1)
        return marked

    def _served(self, key: str) -> CallRecord | None:
        """The stored answer to serve for ``key``: an ok one, or an unusable one whose tries are spent (the method
        then falls back as it did the first time, and nothing is paid again)."""
        record = self.cache.get(key)
        if record is not None:
            return record
        tries, unusable = self.cache.unusable(key)
        if unusable is not None and tries >= self.max_unusable_tries:
            return unusable
        return None

    # -- calls ----------------------------------------------------------------------------------------------
    def key(
        self, messages: Messages, sampling: SamplingConfig | None = None, response_format: dict | None = None
    ) -> str:
        """The call's cache key. ``response_format`` (structured output) joins the keyed sampling parameters only
        when given, so the keys of calls made without one are the same as before it existed."""
        keyed = (sampling or self.sampling).as_dict()
        if response_format is not None:
            keyed = {**keyed, "response_format": response_format}
        return call_key(self.endpoint.model, self.template_hash, messages, keyed)

    def complete(
        self,
        messages: Messages,
        sampling_override: SamplingConfig | None = None,
        response_format: dict | None = None,
    ) -> CallResult:
        """The answer to ``messages``: from the cache if it holds it, else from the endpoint (then stored).
        ``response_format`` is passed to the endpoint as it is (e.g. ``{"type": "json_schema", ...}``)."""
        sampling = sampling_override or self.sampling
        key = self.key(messages, sampling, response_format)
        record = self._served(key)
        if record is not None:
            self._add(cached=1)
            return result_from_record(record, cached=True)
        self._openai()  # the key is needed now (a clear error before anything is reserved)
        self._reserve()
        return self._call(key, messages, sampling, response_format)

    def _call(
        self, key: str, messages: Messages, sampling: SamplingConfig, response_format: dict | None = None
    ) -> CallResult:
        """One call to the endpoint (already admitted by ``_reserve``), stored whatever its outcome."""
        settled = False
        try:
            record, error = self._request(key, messages, sampling, response_format)
            self.cache.put(record)
            deltas = (
                {"errors": 1}
                if error is not None
                else {
                    "calls": 1,
                    "prompt_tokens": record.prompt_tokens,
                    "completion_tokens": record.completion_tokens,
                    "cost_usd": self.budget.cost(record.prompt_tokens, record.completion_tokens),
                    "unusable": int(record.status == "unusable"),
                }
            )
            # leaving the in-flight count and adding the spend in one step: a budget check in between would
            # see neither and admit a call too many
            with self._lock:
                self._in_flight -= 1
                self._counters = _plus(self._counters, **deltas)
                self._consecutive_failures = self._consecutive_failures + 1 if error is not None else 0
                tripped = self._consecutive_failures >= self.breaker.consecutive_failures
                settled = True
            if tripped:
                self._trip(f"{self._consecutive_failures} calls in a row failed (the last: {record.error})")
        finally:
            if not settled:
                with self._lock:
                    self._in_flight -= 1
        if error is not None and self._down is not None:
            raise self.endpoint_down() from error
        if error is not None:
            raise TeacherCallError(f"teacher call {key[:12]} failed: {record.error}", key=key, cause=error) from error
        return result_from_record(record, cached=False)

    def _request(
        self, key: str, messages: Messages, sampling: SamplingConfig, response_format: dict | None = None
    ) -> tuple[CallRecord, Exception | None]:
        """Make the call; its record (ok or error) and, for an error, the exception."""
        request: dict[str, Any] = {"messages": [dict(m) for m in messages], "sampling": sampling.as_dict()}
        extra: dict[str, Any] = {}
        if response_format is not None:
            request["response_format"] = extra["response_format"] = response_format
        common = {"key": key, "model": self.endpoint.model, "template_hash": self.template_hash, "request": request}
        client = self._openai()
        started = time.perf_counter()
        attempt = 0
        while True:
            try:
                reply = client.chat.completions.create(
                    model=self.endpoint.model, messages=request["messages"], **sampling.request_kwargs(), **extra
                )
                completion = _check_reply(reply)
                break
            except BROKEN_REPLY as err:
                # a 200 whose body is not a chat completion (cut short, not JSON, an HTML page): transient, as a
                # proxy's or an overloaded server's are, and the openai client does not retry it
                if attempt >= self.endpoint.max_retries:
                    return self._error_record(common, started, err), err
                time.sleep(backoff_seconds(attempt))
                attempt += 1
            except Exception as err:  # the openai client's errors, after its own retries
                return self._error_record(common, started, err), err
        usage = completion.usage  # some servers leave it out
        choice = completion.choices[0]
        text = choice.message.content
        logprobs = stored_logprobs(completion)
        # an answer with no text (and no log-probabilities to score) is never usable: stored with its cost, and
        # asked again by a later run (see ``max_unusable_tries``)
        empty = not (text or "").strip() and not logprobs
        record = CallRecord(
            **common,
            response_text=text,
            logprobs=logprobs,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            latency_s=time.perf_counter() - started,
            status="unusable" if empty else "ok",
            error="empty answer" if empty else None,
            timestamp=utc_now(),
            run_id=self.run_id,
            finish_reason=choice.finish_reason,
        )
        return record, None

    def _error_record(self, common: dict[str, Any], started: float, err: BaseException) -> CallRecord:
        return CallRecord(
            **common,
            response_text=None,
            logprobs=None,
            prompt_tokens=0,
            completion_tokens=0,
            latency_s=time.perf_counter() - started,
            status="error",
            error=self._redact(f"{type(err).__name__}: {err}"),
            timestamp=utc_now(),
            run_id=self.run_id,
        )

    def complete_many(
        self,
        batch: Sequence[Messages],
        sampling_override: SamplingConfig | None = None,
        desc: str = "teacher",
        response_format: dict | None = None,
    ) -> list[CallResult]:
        """The answers to ``batch``, in order, with up to ``endpoint.max_concurrency`` calls at once.

        Cached answers are served first; identical messages in the batch are called once. Each answer is stored
        as soon as it arrives. A failed call does not stop the others (they are stored; a re-run retries only the
        failures), but once the breaker trips no new call starts and ``EndpointDown`` is raised; otherwise
        ``TeacherCallError`` is raised at the end. ``BudgetExceeded`` stops new calls at once, lets those in
        flight finish (and be stored), then is raised.
        """
        sampling = sampling_override or self.sampling
        keys = [self.key(messages, sampling, response_format) for messages in batch]
        results: list[CallResult | None] = [None] * len(batch)
        to_call: dict[str, list[int]] = {}  # key -> its positions in the batch (the first one is called)
        for index, key in enumerate(keys):
            record = self._served(key)
            if record is not None:
                results[index] = result_from_record(record, cached=True)
            else:
                to_call.setdefault(key, []).append(index)
        served = len(batch) - sum(len(positions) for positions in to_call.values())
        self._add(cached=served)
        if to_call:
            self._openai()  # the key is needed now (a clear error before any call starts)

        made = 0
        failures: list[TeacherCallError] = []
        stop: BudgetExceeded | None = None
        bar = tqdm(total=len(batch), initial=served, desc=desc, unit="call", disable=not self.progress, leave=False)
        bar.set_postfix(cached=served, calls=0, errors=0, remaining=len(batch) - served)
        pending = iter(to_call.items())
        running: dict[cf.Future[CallResult], str] = {}
        with cf.ThreadPoolExecutor(max_workers=self.endpoint.max_concurrency, thread_name_prefix="teacher") as pool:
            try:
                while True:
                    # top up to max_concurrency running calls: no queue of thousands of futures to cancel on a stop
                    while stop is None and self._down is None and len(running) < self.endpoint.max_concurrency:
                        item = next(pending, None)
                        if item is None:
                            break
                        try:
                            self._reserve()
                        except BudgetExceeded as err:
                            stop = err
                            break
                        key, positions = item
                        running[pool.submit(self._call, key, batch[positions[0]], sampling, response_format)] = key
                    if not running:
                        break
                    done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                    for future in done:
                        key = running.pop(future)
                        try:
                            result = future.result()
                        except TeacherCallError as err:
                            failures.append(err)
                            continue
                        made += 1
                        first, *repeats = to_call[key]
                        results[first] = result
                        for index in repeats:  # the same messages again in this batch: answered by the one call
                            results[index] = _as_cached(result)
                        bar.update(1 + len(repeats))
                    bar.set_postfix(cached=served, calls=made, errors=len(failures), remaining=len(batch) - bar.n)
            finally:
                bar.close()

        self._add(cached=sum(len(positions) - 1 for positions in to_call.values() if results[positions[0]]))
        if stop is not None:  # raised now, with the counters of everything done, in-flight calls included
            raise BudgetExceeded(f"{stop} (stopped after {made} calls in this batch)", self.counters) from None
        if self._down is not None:
            raise self.endpoint_down() from (failures[0] if failures else None)
        if failures:
            first = failures[0]
            raise TeacherCallError(
                f"{len(failures)} of {len(to_call)} teacher calls failed (stored as error records; a re-run retries "
                f"them); the first: {first}",
                key=first.key,
                cause=first.cause,
            ) from first
        return [r for r in results if r is not None]


def _plus(counters: TeacherCounters, **deltas: float) -> TeacherCounters:
    return dataclasses.replace(counters, **{name: getattr(counters, name) + delta for name, delta in deltas.items()})


def _as_cached(result: CallResult) -> CallResult:
    return dataclasses.replace(result, cached=True)
