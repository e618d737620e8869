"""Run moto in server mode (S3, DynamoDB, KMS; every region on one port).

Started by scripts/moto.sh. Before serving, widens the key-id field of moto's
KMS ciphertext format from 36 to 40 bytes: moto 5.2.5 stores the key id of a
ciphertext in a fixed 36-byte field, which truncates multi-region key ids
("mrk-" + 36 characters) so that Decrypt of their ciphertexts fails.
"""

import struct
import sys

import moto.kms.utils as kms_utils
from moto.server import main

KEY_ID_LEN = 40
kms_utils.KEY_ID_LEN = KEY_ID_LEN
kms_utils.HEADER_LEN = KEY_ID_LEN + kms_utils.IV_LEN + kms_utils.TAG_LEN
kms_utils.CIPHERTEXT_HEADER_FORMAT = (
    f">{KEY_ID_LEN}s{kms_utils.IV_LEN}s{kms_utils.TAG_LEN}s"
)


# moto calls this with the keyword argument ciphertext_blob: keep the parameter name.
def _deserialize_ciphertext_blob(ciphertext_blob: bytes) -> "kms_utils.Ciphertext":
    blob = ciphertext_blob
    header = blob[: kms_utils.HEADER_LEN]
    key_id, iv, tag = struct.unpack(kms_utils.CIPHERTEXT_HEADER_FORMAT, header)
    return kms_utils.Ciphertext(
        key_id=key_id.rstrip(b"\0").decode("utf-8"),
        iv=iv,
        ciphertext=blob[kms_utils.HEADER_LEN :],
        tag=tag,
    )


kms_utils._deserialize_ciphertext_blob = _deserialize_ciphertext_blob

if __name__ == "__main__":
    main(sys.argv[1:])
