# Generated — do not edit; regenerate with `make proto` (scripts/gen_protos.py).
import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVER_STATE_UNSPECIFIED: _ClassVar[ServerState]
    SERVER_STATE_STARTING: _ClassVar[ServerState]
    SERVER_STATE_RUNNING: _ClassVar[ServerState]
    SERVER_STATE_STOPPING: _ClassVar[ServerState]
    SERVER_STATE_STOPPED: _ClassVar[ServerState]
    SERVER_STATE_UNKNOWN: _ClassVar[ServerState]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_PROGRESS: _ClassVar[EventKind]
    EVENT_KIND_READY: _ClassVar[EventKind]
    EVENT_KIND_FAILED: _ClassVar[EventKind]

class StopOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_OUTCOME_UNSPECIFIED: _ClassVar[StopOutcome]
    STOP_OUTCOME_STOPPED: _ClassVar[StopOutcome]
    STOP_OUTCOME_NOT_FOUND: _ClassVar[StopOutcome]
    STOP_OUTCOME_STALE_START_ID: _ClassVar[StopOutcome]
SERVER_STATE_UNSPECIFIED: ServerState
SERVER_STATE_STARTING: ServerState
SERVER_STATE_RUNNING: ServerState
SERVER_STATE_STOPPING: ServerState
SERVER_STATE_STOPPED: ServerState
SERVER_STATE_UNKNOWN: ServerState
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_PROGRESS: EventKind
EVENT_KIND_READY: EventKind
EVENT_KIND_FAILED: EventKind
STOP_OUTCOME_UNSPECIFIED: StopOutcome
STOP_OUTCOME_STOPPED: StopOutcome
STOP_OUTCOME_NOT_FOUND: StopOutcome
STOP_OUTCOME_STALE_START_ID: StopOutcome

class User(_message.Message):
    __slots__ = ("name", "id", "admin", "groups")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    id: int
    admin: bool
    groups: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., id: _Optional[int] = ..., admin: _Optional[bool] = ..., groups: _Optional[_Iterable[str]] = ...) -> None: ...

class InternalSslCertificates(_message.Message):
    __slots__ = ("key_pem", "cert_pem", "ca_pem")
    KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    key_pem: str
    cert_pem: str
    ca_pem: str
    def __init__(self, key_pem: _Optional[str] = ..., cert_pem: _Optional[str] = ..., ca_pem: _Optional[str] = ...) -> None: ...

class ServerAddress(_message.Message):
    __slots__ = ("scheme", "host", "port")
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    scheme: str
    host: str
    port: int
    def __init__(self, scheme: _Optional[str] = ..., host: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class ServerStatus(_message.Message):
    __slots__ = ("server_name", "start_id", "state", "address", "exit_code", "failure_message", "user_name", "start_time", "flavor", "end_time", "stop_message", "output_tail")
    SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    START_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    USER_NAME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    FLAVOR_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    STOP_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TAIL_FIELD_NUMBER: _ClassVar[int]
    server_name: str
    start_id: str
    state: ServerState
    address: ServerAddress
    exit_code: int
    failure_message: str
    user_name: str
    start_time: _timestamp_pb2.Timestamp
    flavor: str
    end_time: _timestamp_pb2.Timestamp
    stop_message: str
    output_tail: str
    def __init__(self, server_name: _Optional[str] = ..., start_id: _Optional[str] = ..., state: _Optional[_Union[ServerState, str]] = ..., address: _Optional[_Union[ServerAddress, _Mapping]] = ..., exit_code: _Optional[int] = ..., failure_message: _Optional[str] = ..., user_name: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., flavor: _Optional[str] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stop_message: _Optional[str] = ..., output_tail: _Optional[str] = ...) -> None: ...

class StartRequest(_message.Message):
    __slots__ = ("server_name", "start_id", "user", "env", "user_options", "config_overrides", "internal_ssl", "spawner_name", "wait_until_ready", "flavor", "auth_state")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    START_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    USER_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    INTERNAL_SSL_FIELD_NUMBER: _ClassVar[int]
    SPAWNER_NAME_FIELD_NUMBER: _ClassVar[int]
    WAIT_UNTIL_READY_FIELD_NUMBER: _ClassVar[int]
    FLAVOR_FIELD_NUMBER: _ClassVar[int]
    AUTH_STATE_FIELD_NUMBER: _ClassVar[int]
    server_name: str
    start_id: str
    user: User
    env: _containers.ScalarMap[str, str]
    user_options: _struct_pb2.Struct
    config_overrides: _struct_pb2.Struct
    internal_ssl: InternalSslCertificates
    spawner_name: str
    wait_until_ready: bool
    flavor: str
    auth_state: _struct_pb2.Struct
    def __init__(self, server_name: _Optional[str] = ..., start_id: _Optional[str] = ..., user: _Optional[_Union[User, _Mapping]] = ..., env: _Optional[_Mapping[str, str]] = ..., user_options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., config_overrides: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., internal_ssl: _Optional[_Union[InternalSslCertificates, _Mapping]] = ..., spawner_name: _Optional[str] = ..., wait_until_ready: _Optional[bool] = ..., flavor: _Optional[str] = ..., auth_state: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class StartResponse(_message.Message):
    __slots__ = ("status", "created")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    status: ServerStatus
    created: bool
    def __init__(self, status: _Optional[_Union[ServerStatus, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("server_name", "start_id", "after_sequence")
    SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    START_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    server_name: str
    start_id: str
    after_sequence: int
    def __init__(self, server_name: _Optional[str] = ..., start_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class EventsResponse(_message.Message):
    __slots__ = ("sequence", "start_id", "kind", "message", "html_message", "progress", "time", "address", "error_class", "output_tail")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    START_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HTML_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TAIL_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    start_id: str
    kind: EventKind
    message: str
    html_message: str
    progress: int
    time: _timestamp_pb2.Timestamp
    address: ServerAddress
    error_class: str
    output_tail: str
    def __init__(self, sequence: _Optional[int] = ..., start_id: _Optional[str] = ..., kind: _Optional[_Union[EventKind, str]] = ..., message: _Optional[str] = ..., html_message: _Optional[str] = ..., progress: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., address: _Optional[_Union[ServerAddress, _Mapping]] = ..., error_class: _Optional[str] = ..., output_tail: _Optional[str] = ...) -> None: ...

class PollRequest(_message.Message):
    __slots__ = ("server_name",)
    SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    server_name: str
    def __init__(self, server_name: _Optional[str] = ...) -> None: ...

class PollResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: ServerStatus
    def __init__(self, status: _Optional[_Union[ServerStatus, _Mapping]] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("server_name", "start_id")
    SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    START_ID_FIELD_NUMBER: _ClassVar[int]
    server_name: str
    start_id: str
    def __init__(self, server_name: _Optional[str] = ..., start_id: _Optional[str] = ...) -> None: ...

class StopResponse(_message.Message):
    __slots__ = ("outcome", "current")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    outcome: StopOutcome
    current: ServerStatus
    def __init__(self, outcome: _Optional[_Union[StopOutcome, str]] = ..., current: _Optional[_Union[ServerStatus, _Mapping]] = ...) -> None: ...

class ListServersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListServersResponse(_message.Message):
    __slots__ = ("servers", "next_page_token")
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    servers: _containers.RepeatedCompositeFieldContainer[ServerStatus]
    next_page_token: str
    def __init__(self, servers: _Optional[_Iterable[_Union[ServerStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class BatchPollRequest(_message.Message):
    __slots__ = ("server_names",)
    SERVER_NAMES_FIELD_NUMBER: _ClassVar[int]
    server_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, server_names: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchPollResponse(_message.Message):
    __slots__ = ("statuses", "not_found")
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[ServerStatus]
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, statuses: _Optional[_Iterable[_Union[ServerStatus, _Mapping]]] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class ListFlavorsRequest(_message.Message):
    __slots__ = ("user",)
    USER_FIELD_NUMBER: _ClassVar[int]
    user: User
    def __init__(self, user: _Optional[_Union[User, _Mapping]] = ...) -> None: ...

class ListFlavorsResponse(_message.Message):
    __slots__ = ("flavors", "default_flavor", "user_max_total", "user_in_use_total")
    FLAVORS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FLAVOR_FIELD_NUMBER: _ClassVar[int]
    USER_MAX_TOTAL_FIELD_NUMBER: _ClassVar[int]
    USER_IN_USE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    flavors: _containers.RepeatedCompositeFieldContainer[Flavor]
    default_flavor: str
    user_max_total: int
    user_in_use_total: int
    def __init__(self, flavors: _Optional[_Iterable[_Union[Flavor, _Mapping]]] = ..., default_flavor: _Optional[str] = ..., user_max_total: _Optional[int] = ..., user_in_use_total: _Optional[int] = ...) -> None: ...

class Flavor(_message.Message):
    __slots__ = ("name", "display_name", "description", "max_total", "max_per_hub", "max_per_user", "in_use_total", "in_use_hub", "in_use_user", "max_runtime_seconds", "available", "unavailable_reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_HUB_FIELD_NUMBER: _ClassVar[int]
    MAX_PER_USER_FIELD_NUMBER: _ClassVar[int]
    IN_USE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    IN_USE_HUB_FIELD_NUMBER: _ClassVar[int]
    IN_USE_USER_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    description: str
    max_total: int
    max_per_hub: int
    max_per_user: int
    in_use_total: int
    in_use_hub: int
    in_use_user: int
    max_runtime_seconds: int
    available: bool
    unavailable_reason: str
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ..., description: _Optional[str] = ..., max_total: _Optional[int] = ..., max_per_hub: _Optional[int] = ..., max_per_user: _Optional[int] = ..., in_use_total: _Optional[int] = ..., in_use_hub: _Optional[int] = ..., in_use_user: _Optional[int] = ..., max_runtime_seconds: _Optional[int] = ..., available: _Optional[bool] = ..., unavailable_reason: _Optional[str] = ...) -> None: ...
