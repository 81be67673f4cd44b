"""What a Kafka failure means, decided in one place for every aiokafka client of the
service (the bus, its metrics producer, the repartition router, the Kafka sink and the
Kafka checkpoint store), as :mod:`service.postgres.errors` does for PostgreSQL.

Failure classes and what each backend does with them (one retry loop each, the
:func:`service.core.retry.retry` helper; nothing retries inside another retry):

=============  =====================================  =====================================
class          meaning                                policy
=============  =====================================  =====================================
transient      broker unreachable, leader moving,     :class:`TransientError`: retried with
               request timed out, not enough          backoff for ever. Start-up: the app's
               replicas                               start loop (one attempt per start).
                                                      Bus and router poll: their poll loop,
                                                      which retries every class but config.
                                                      Sink write and checkpoint save: the
                                                      sender's retry. Checkpoint load: the
                                                      bus's restore (a few attempts, then
                                                      the intake stops). Metrics producer
                                                      and commit: logged and counted, the
                                                      next report/commit is the retry.
ownership      the group moved on (commit after a     never retried: the group rebalances
               rebalance, unknown member, fenced)     and the new owner resumes from the
                                                      checkpoint; a commit is skipped.
record         a record is refused for its content    :class:`PermanentError` naming the
               (too large, invalid)                   setting (sink: KAFKA_MAX_REQUEST_SIZE).
config         authentication, authorisation, an      :class:`PermanentError` naming what to
               invalid topic or configuration, an     check: start-up fails, a running bus
               unsupported broker                     or router stops (fail fast).
other          any other error, unless it says it     as ``config`` (the same call would
               is retriable (then ``transient``)      fail again, as pg_errors' ``other``),
                                                      except in a running reader's poll:
                                                      retried there, as ``ownership`` is.
=============  =====================================  =====================================

aiokafka reports a login the broker refuses while bootstrapping (a wrong SASL mechanism
or password) as ``KafkaConnectionError: Unable to bootstrap``, so it counts as transient
and is retried; aiokafka's own log line names the cause.

A :class:`PermanentError` from an output is not a loss: the sender hands it to the hub,
which runs the sender again with backoff, so the output holds until an operator acts.
"""

from __future__ import annotations

from typing import Final, Literal

from aiokafka import errors as ke

from service.core.errors import PermanentError, TransientError, describe_error

__all__ = [
    "KAFKA_FAILURES",
    "KafkaErrorKind",
    "is_transient",
    "kafka_error",
    "kafka_error_kind",
    "keeps_reading",
]

KAFKA_FAILURES: Final = (ke.KafkaError, OSError)
"""What a call of an aiokafka client raises when Kafka fails (OSError covers the socket's
errors and TimeoutError); anything else is a bug of ours and is not classified."""

KafkaErrorKind = Literal["transient", "ownership", "record", "config", "other"]

# Retriable in fact although aiokafka does not flag them: a request that got no answer in
# time, a broker or replica that is down, a client quota, a broker that refused the
# connection (aiokafka's own retriable flag covers the rest: connection, leader, coordinator,
# replicas).
_TRANSIENT: Final = (
    ke.KafkaTimeoutError,
    ke.KafkaUnavailableError,
    ke.BrokerNotAvailableError,
    ke.ReplicaNotAvailableError,
    ke.QuotaViolationError,
    ke.KafkaStorageError,
    OSError,  # ConnectionError and the socket's other failures
    TimeoutError,
)
_OWNERSHIP: Final = (
    ke.CommitFailedError,
    ke.IllegalStateError,  # aiokafka: a commit of partitions no longer assigned here
    ke.IllegalGenerationError,
    ke.UnknownMemberIdError,
    ke.RebalanceInProgressError,
    ke.ProducerFenced,
    ke.InvalidProducerEpoch,
)
_RECORD: Final = (
    ke.MessageSizeTooLargeError,
    ke.RecordListTooLargeError,
    ke.RecordTooLargeError,
    ke.InvalidMessageError,  # also CorruptRecordException (the same code)
    ke.InvalidTimestampError,
)
_CONFIG: Final = (
    ke.AuthenticationFailedError,
    ke.AuthenticationMethodNotSupported,
    ke.SaslAuthenticationFailed,
    ke.UnsupportedSaslMechanismError,
    ke.IllegalSaslStateError,
    ke.TopicAuthorizationFailedError,
    ke.GroupAuthorizationFailedError,
    ke.ClusterAuthorizationFailedError,
    ke.TransactionalIdAuthorizationFailed,
    ke.InvalidTopicError,
    ke.InvalidPartitionsError,
    ke.InvalidReplicationFactorError,
    ke.InvalidConfigurationError,
    ke.PolicyViolationError,
    ke.InvalidGroupIdError,
    ke.InvalidSessionTimeoutError,
    ke.KafkaConfigurationError,
    ke.UnsupportedVersionError,
    ke.UnrecognizedBrokerVersion,
    ke.IncompatibleBrokerVersion,
    ke.UnsupportedCodecError,
    ke.SecurityDisabled,
)


def kafka_error_kind(exc: BaseException) -> KafkaErrorKind:
    """What an exception from aiokafka (or the socket under it) means for the caller;
    the classes are described in the module's table."""
    if isinstance(exc, TransientError):
        return "transient"  # already classified (by a lower layer of ours)
    if isinstance(exc, _OWNERSHIP):
        return "ownership"
    if isinstance(exc, _RECORD):
        return "record"
    if isinstance(exc, _CONFIG):
        return "config"
    if isinstance(exc, _TRANSIENT) or (isinstance(exc, ke.KafkaError) and exc.retriable):
        return "transient"
    return "other"


def keeps_reading(exc: BaseException) -> bool:
    """Whether a running reader (the bus's poll loop, the repartition router) tries
    again: every failure but a refusal of its credentials, rights or topic (``config``),
    which surfaces and stops the service naming what to check. A reader loses nothing by
    waiting, and an unknown failure or a rebalance race (``ownership``) while reading
    has always been retried: stopping on it would turn a blip into a restart."""
    return kafka_error_kind(exc) != "config"


def is_transient(exc: BaseException) -> bool:
    """Whether retrying later can help: the ``retriable`` predicate of Kafka retry loops."""
    return kafka_error_kind(exc) == "transient"


def kafka_error(
    exc: BaseException, operation: str, servers: str, *, hint: str = ""
) -> TransientError | PermanentError:
    """``exc``, raised by Kafka at ``servers`` during ``operation`` (a few words: "kafka
    sink: write"), as a :class:`TransientError` when retrying can help, else a
    :class:`PermanentError`. ``hint`` (what to check or change) ends the message; a
    ``config`` error without one gets a general one."""
    kind = kafka_error_kind(exc)
    detail = describe_error(exc)
    if kind == "config" and not hint:
        hint = "check the security protocol, the SASL settings, the ACLs and the topic names"
    suffix = f"; {hint}" if hint else ""
    if kind == "transient":
        return TransientError(f"Kafka at {servers} unavailable ({operation}): {detail}{suffix}")
    verdict = {
        "ownership": "no longer counts this member as the owner",
        "record": "refused a record",
        "config": "refused the request",
        "other": "failed with an unexpected error",
    }[kind]
    return PermanentError(f"Kafka at {servers} {verdict} ({operation}): {detail}{suffix}")
