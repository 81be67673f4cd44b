"""Kafka failures onto the error tree: one classification for every Kafka user."""

from __future__ import annotations

import inspect

import pytest
from aiokafka import errors as ke

from service.core.errors import PermanentError, TransientError
from service.kafka.errors import KafkaErrorKind, is_transient, kafka_error, kafka_error_kind

SERVERS = "k1:9092,k2:9092"


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ke.KafkaConnectionError("refused"), "transient"),
        (ke.NoBrokersAvailable(), "transient"),
        (ke.NodeNotReadyError(), "transient"),
        (ke.LeaderNotAvailableError(), "transient"),
        (ke.NotLeaderForPartitionError(), "transient"),
        (ke.UnknownTopicOrPartitionError(), "transient"),  # metadata not yet propagated
        (ke.RequestTimedOutError(), "transient"),
        (ke.NotEnoughReplicasError(), "transient"),
        (ke.CoordinatorNotAvailableError(), "transient"),
        (ke.KafkaTimeoutError(), "transient"),  # aiokafka does not flag it retriable
        (ke.BrokerNotAvailableError(), "transient"),  # nor this one
        (ke.KafkaUnavailableError(), "transient"),
        (ConnectionResetError(104, "reset"), "transient"),
        (TimeoutError(), "transient"),
        (TransientError("already classified"), "transient"),
        (ke.CommitFailedError(), "ownership"),
        (ke.IllegalStateError("not assigned"), "ownership"),
        (ke.IllegalGenerationError(), "ownership"),
        (ke.UnknownMemberIdError(), "ownership"),
        (ke.RebalanceInProgressError(), "ownership"),
        (ke.ProducerFenced(), "ownership"),
        (ke.MessageSizeTooLargeError(), "record"),
        (ke.RecordListTooLargeError(), "record"),
        (ke.RecordTooLargeError(), "record"),
        (ke.CorruptRecordException(), "record"),
        (ke.InvalidTimestampError(), "record"),
        (ke.TopicAuthorizationFailedError(), "config"),
        (ke.GroupAuthorizationFailedError(), "config"),
        (ke.ClusterAuthorizationFailedError(), "config"),
        (ke.SaslAuthenticationFailed(), "config"),
        (ke.AuthenticationFailedError(), "config"),
        (ke.UnsupportedSaslMechanismError(), "config"),
        (ke.InvalidTopicError(), "config"),
        (ke.PolicyViolationError(), "config"),
        (ke.InvalidReplicationFactorError(), "config"),
        (ke.UnsupportedVersionError(), "config"),
        (ke.UnknownError(), "other"),
        (ke.KafkaError("what"), "other"),
        (ke.OffsetOutOfRangeError(), "other"),
        (PermanentError("already classified"), "other"),
        (RuntimeError("a bug of ours"), "other"),
    ],
)
def test_kinds_follow_the_error_class(exc: BaseException, kind: KafkaErrorKind) -> None:
    assert kafka_error_kind(exc) == kind
    assert is_transient(exc) is (kind == "transient")


def _all_kafka_errors() -> list[type[ke.KafkaError]]:
    return [
        c
        for c in vars(ke).values()
        if inspect.isclass(c) and issubclass(c, ke.KafkaError) and c is not ke.NoError
    ]


@pytest.mark.parametrize("cls", _all_kafka_errors(), ids=lambda c: c.__name__)
def test_every_error_aiokafka_flags_retriable_is_transient(cls: type[ke.KafkaError]) -> None:
    """aiokafka's own flag is never overruled towards giving up."""
    if cls.retriable:
        assert kafka_error_kind(cls()) == "transient"


def test_a_transient_error_names_the_servers_the_operation_and_the_hint() -> None:
    err = kafka_error(
        ke.KafkaConnectionError("refused"), "kafka bus: connect", SERVERS, hint="check VABUS_URL"
    )
    assert isinstance(err, TransientError) and err.retriable
    assert str(err) == (
        f"Kafka at {SERVERS} unavailable (kafka bus: connect): "
        "KafkaConnectionError: refused; check VABUS_URL"
    )


def test_a_refusal_is_permanent_and_says_what_to_check_even_without_a_hint() -> None:
    err = kafka_error(ke.TopicAuthorizationFailedError(), "checkpoints: write", SERVERS)
    assert isinstance(err, PermanentError) and not err.retriable
    assert "refused the request (checkpoints: write)" in str(err)
    assert "ACLs" in str(err)


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (ke.MessageSizeTooLargeError(), "refused a record"),
        (ke.CommitFailedError(), "no longer counts this member as the owner"),
        (ke.UnknownError(), "failed with an unexpected error"),
    ],
)
def test_the_other_kinds_are_permanent_and_say_which_they_are(
    exc: BaseException, words: str
) -> None:
    err = kafka_error(exc, "kafka sink: write", SERVERS, hint="raise KAFKA_MAX_REQUEST_SIZE")
    assert isinstance(err, PermanentError)
    assert words in str(err) and str(err).endswith("; raise KAFKA_MAX_REQUEST_SIZE")
