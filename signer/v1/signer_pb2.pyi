from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Algorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALGORITHM_UNSPECIFIED: _ClassVar[Algorithm]
    RSA_PKCS1V15_MD5SHA1: _ClassVar[Algorithm]
    RSA_PKCS1V15_SHA1: _ClassVar[Algorithm]
    RSA_PKCS1V15_SHA224: _ClassVar[Algorithm]
    RSA_PKCS1V15_SHA256: _ClassVar[Algorithm]
    RSA_PKCS1V15_SHA384: _ClassVar[Algorithm]
    RSA_PKCS1V15_SHA512: _ClassVar[Algorithm]
    RSA_PSS_SHA256: _ClassVar[Algorithm]
    RSA_PSS_SHA384: _ClassVar[Algorithm]
    RSA_PSS_SHA512: _ClassVar[Algorithm]
    ECDSA_MD5SHA1: _ClassVar[Algorithm]
    ECDSA_SHA1: _ClassVar[Algorithm]
    ECDSA_SHA224: _ClassVar[Algorithm]
    ECDSA_SHA256: _ClassVar[Algorithm]
    ECDSA_SHA384: _ClassVar[Algorithm]
    ECDSA_SHA512: _ClassVar[Algorithm]
    ED25519: _ClassVar[Algorithm]

class DecryptMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECRYPT_MODE_UNSPECIFIED: _ClassVar[DecryptMode]
    DECRYPT_MODE_RAW: _ClassVar[DecryptMode]
    DECRYPT_MODE_PKCS1V15: _ClassVar[DecryptMode]

class KeyType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_TYPE_UNSPECIFIED: _ClassVar[KeyType]
    KEY_TYPE_RSA: _ClassVar[KeyType]
    KEY_TYPE_EC: _ClassVar[KeyType]
    KEY_TYPE_ED25519: _ClassVar[KeyType]
ALGORITHM_UNSPECIFIED: Algorithm
RSA_PKCS1V15_MD5SHA1: Algorithm
RSA_PKCS1V15_SHA1: Algorithm
RSA_PKCS1V15_SHA224: Algorithm
RSA_PKCS1V15_SHA256: Algorithm
RSA_PKCS1V15_SHA384: Algorithm
RSA_PKCS1V15_SHA512: Algorithm
RSA_PSS_SHA256: Algorithm
RSA_PSS_SHA384: Algorithm
RSA_PSS_SHA512: Algorithm
ECDSA_MD5SHA1: Algorithm
ECDSA_SHA1: Algorithm
ECDSA_SHA224: Algorithm
ECDSA_SHA256: Algorithm
ECDSA_SHA384: Algorithm
ECDSA_SHA512: Algorithm
ED25519: Algorithm
DECRYPT_MODE_UNSPECIFIED: DecryptMode
DECRYPT_MODE_RAW: DecryptMode
DECRYPT_MODE_PKCS1V15: DecryptMode
KEY_TYPE_UNSPECIFIED: KeyType
KEY_TYPE_RSA: KeyType
KEY_TYPE_EC: KeyType
KEY_TYPE_ED25519: KeyType

class KeySelector(_message.Message):
    __slots__ = ("ski", "label")
    SKI_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ski: bytes
    label: str
    def __init__(self, ski: _Optional[bytes] = ..., label: _Optional[str] = ...) -> None: ...

class SignRequest(_message.Message):
    __slots__ = ("key", "algorithm", "data")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    key: KeySelector
    algorithm: Algorithm
    data: bytes
    def __init__(self, key: _Optional[_Union[KeySelector, _Mapping]] = ..., algorithm: _Optional[_Union[Algorithm, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SignResponse(_message.Message):
    __slots__ = ("signature",)
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    def __init__(self, signature: _Optional[bytes] = ...) -> None: ...

class DecryptRequest(_message.Message):
    __slots__ = ("key", "mode", "ciphertext")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    key: KeySelector
    mode: DecryptMode
    ciphertext: bytes
    def __init__(self, key: _Optional[_Union[KeySelector, _Mapping]] = ..., mode: _Optional[_Union[DecryptMode, str]] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class DecryptResponse(_message.Message):
    __slots__ = ("plaintext",)
    PLAINTEXT_FIELD_NUMBER: _ClassVar[int]
    plaintext: bytes
    def __init__(self, plaintext: _Optional[bytes] = ...) -> None: ...

class Key(_message.Message):
    __slots__ = ("ski", "label", "type", "bits", "curve", "public_key", "algorithms", "decrypt_modes", "id")
    SKI_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    CURVE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ALGORITHMS_FIELD_NUMBER: _ClassVar[int]
    DECRYPT_MODES_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ski: bytes
    label: str
    type: KeyType
    bits: int
    curve: str
    public_key: bytes
    algorithms: _containers.RepeatedScalarFieldContainer[Algorithm]
    decrypt_modes: _containers.RepeatedScalarFieldContainer[DecryptMode]
    id: bytes
    def __init__(self, ski: _Optional[bytes] = ..., label: _Optional[str] = ..., type: _Optional[_Union[KeyType, str]] = ..., bits: _Optional[int] = ..., curve: _Optional[str] = ..., public_key: _Optional[bytes] = ..., algorithms: _Optional[_Iterable[_Union[Algorithm, str]]] = ..., decrypt_modes: _Optional[_Iterable[_Union[DecryptMode, str]]] = ..., id: _Optional[bytes] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys", "generation", "signer_id", "token")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SIGNER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[Key]
    generation: int
    signer_id: str
    token: str
    def __init__(self, keys: _Optional[_Iterable[_Union[Key, _Mapping]]] = ..., generation: _Optional[int] = ..., signer_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class WatchKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Operation(_message.Message):
    __slots__ = ("id", "sign", "decrypt", "timeout_us", "traceparent")
    ID_FIELD_NUMBER: _ClassVar[int]
    SIGN_FIELD_NUMBER: _ClassVar[int]
    DECRYPT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_US_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    id: int
    sign: SignRequest
    decrypt: DecryptRequest
    timeout_us: int
    traceparent: str
    def __init__(self, id: _Optional[int] = ..., sign: _Optional[_Union[SignRequest, _Mapping]] = ..., decrypt: _Optional[_Union[DecryptRequest, _Mapping]] = ..., timeout_us: _Optional[int] = ..., traceparent: _Optional[str] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("operations",)
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    operations: _containers.RepeatedCompositeFieldContainer[Operation]
    def __init__(self, operations: _Optional[_Iterable[_Union[Operation, _Mapping]]] = ...) -> None: ...

class OperationResult(_message.Message):
    __slots__ = ("id", "output", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: int
    output: bytes
    error: Status
    def __init__(self, id: _Optional[int] = ..., output: _Optional[bytes] = ..., error: _Optional[_Union[Status, _Mapping]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[OperationResult]
    def __init__(self, results: _Optional[_Iterable[_Union[OperationResult, _Mapping]]] = ...) -> None: ...
