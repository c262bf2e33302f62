"""A reference consumer of Usher's email queue, for a pipeline that sends
Usher's emails itself (docs/notification.md, "Taking over delivery";
docs/queue-contract.md).

It declares its own durable quorum queue bound on `usher.email` /
`email.send`, takes the jobs of the sources it handles (the others are left
to Usher's notification service), does not send again a job it has
already handled (the queue is at least once: dedupe on `job_id`; its result
is published again), opens the sealed link with the
shared key, "sends" the email to an SMTP server or writes it to a folder,
and publishes the `DeliveryResult` on `usher.email` / `email.result.<source>`,
which the producer records exactly as it records the built-in service's.

Configuration, from the environment:

  AMQP_URL         amqp://guest:guest@127.0.0.1:5672/%2f
  QUEUE            usher.partner.email-jobs (this pipeline's own queue)
  SOURCES          invitation (comma-separated: invitation, identity)
  SEAL_KEYS        key_id=base64key[,key_id=base64key...] (current and previous keys)
  SMTP_HOST        127.0.0.1 (with SMTP_PORT, 25) ... or MAIL_FOLDER: write .eml files
  MAIL_FROM        Partner <no-reply@partner.example>
  MESSAGE_ID_HOST  partner.example (Message-ID: <job_id@host>, the same on every copy)
  STATE_DB         consumer-state.sqlite3 (the jobs already handled)

`python consumer.py --check-vectors` checks the seal test vectors of
docs/notification.md and exits. Needs the generated module on PYTHONPATH
(generate.sh).
"""

import base64
import email.message
import email.utils
import os
import signal
import smtplib
import sqlite3
import sys
import time

import pika
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt
from nacl.exceptions import CryptoError

from usher.notification.v1 import email_job_pb2 as pb

EMAIL_EXCHANGE = "usher.email"
JOB_ROUTING_KEY = "email.send"
RESULT_TYPE = "usher.notification.v1.DeliveryResult"
PROTOBUF = "application/protobuf"
NONCE_BYTES = 24
TAG_BYTES = 16
SOURCES = {
    "identity": pb.EMAIL_SOURCE_IDENTITY,
    "invitation": pb.EMAIL_SOURCE_INVITATION,
}
SOURCE_NAMES = {value: name for name, value in SOURCES.items()}

# docs/notification.md, "The seal format": (base64 key, hex nonce, job id,
# link, hex sealed value).
VECTORS = [
    (
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        "404142434445464748494a4b4c4d4e4f5051525354555657",
        "0190f1f2-7c1e-7a3b-9c4d-5e6f7a8b9c0d",
        "https://usher.example/invite?token=3fA9xQ2bLmN8pR4sT6uV0wY1zA3cE5gI7kM9oQ1sU3w",
        "404142434445464748494a4b4c4d4e4f5051525354555657bc4d7100a3da5639fa87efdbddb200ea"
        "f3d7dda876763af41c58892036704cfb73973f5d33d3bd68ae8096006794e281c95f0ebc59f0e2ac"
        "c1a5398e52812f116f4cb1457ffe7ca7d432c3aaef0e0baeb45fefed9247f2577c851a2e6f3a",
    ),
    (
        "//79/Pv6+fj39vX08/Lx8O/u7ezr6uno5+bl5OPi4eA=",
        "000000000000000000000000000000000000000000000000",
        "3b2d8f0e-4a6c-4e1b-9d7f-2c5a8e0b1d3f",
        "https://usher.example/reset?token=Zz",
        "000000000000000000000000000000000000000000000000cbaf396e72f5735c8342348a53abb495"
        "8054434a5ec912a9ce21972f6f81414d6268ede04c7a5f03e394316580ed6aabdf261502",
    ),
]


class Permanent(Exception):
    """The job can never be sent as it is."""


def open_link(key: bytes, job_id: str, sealed: bytes) -> str:
    """sealed = nonce (24) || ciphertext || tag (16), associated data = job id."""
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise Permanent("sealed link malformed")
    nonce, ciphertext = sealed[:NONCE_BYTES], sealed[NONCE_BYTES:]
    try:
        plain = crypto_aead_xchacha20poly1305_ietf_decrypt(
            ciphertext, job_id.encode("utf-8"), nonce, key
        )
    except CryptoError as error:
        raise Permanent("sealed link not authentic") from error
    return plain.decode("utf-8")


def check_vectors() -> None:
    for key, nonce, job_id, link, sealed in VECTORS:
        opened = open_link(base64.b64decode(key), job_id, bytes.fromhex(sealed))
        assert opened == link, (job_id, opened)
        assert bytes.fromhex(sealed)[:NONCE_BYTES] == bytes.fromhex(nonce)
    print(f"{len(VECTORS)} seal test vectors open", flush=True)


def parse_keys(text: str) -> dict:
    keys = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key_id, _, encoded = item.partition("=")
        # The key is standard base64 of 32 bytes; its own '=' padding stays
        # in `encoded` (partition splits on the first '=' only).
        key = base64.b64decode(encoded, validate=True)
        if len(key) != 32:
            raise SystemExit(f"SEAL_KEYS: key {key_id!r} is not 32 bytes")
        keys[key_id] = key
    return keys


class State:
    """The jobs handled so far, kept across restarts (dedupe on job_id)."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, status INTEGER NOT NULL,"
            " attempts INTEGER NOT NULL, reason TEXT NOT NULL DEFAULT '',"
            " message_id TEXT NOT NULL DEFAULT '')"
        )
        self.db.commit()

    def outcome(self, job_id: str):
        """(status, attempts, reason, message_id) of a job handled before, or None."""
        return self.db.execute(
            "SELECT status, attempts, reason, message_id FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()

    def attempt(self, job_id: str) -> int:
        self.db.execute(
            "INSERT INTO jobs (job_id, status, attempts) VALUES (?, ?, 1)"
            " ON CONFLICT(job_id) DO UPDATE SET attempts = attempts + 1",
            (job_id, pb.DELIVERY_STATUS_QUEUED),
        )
        self.db.commit()
        row = self.db.execute("SELECT attempts FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return row[0]

    def finish(self, job_id: str, status: int, reason: str, message_id: str) -> None:
        self.db.execute(
            "UPDATE jobs SET status = ?, reason = ?, message_id = ? WHERE job_id = ?",
            (status, reason, message_id, job_id),
        )
        self.db.commit()


class Consumer:
    def __init__(self, env):
        self.queue = env.get("QUEUE", "usher.partner.email-jobs")
        names = [s.strip() for s in env.get("SOURCES", "invitation").split(",") if s.strip()]
        unknown = [name for name in names if name not in SOURCES]
        if unknown:
            raise SystemExit(f"SOURCES: unknown source(s) {unknown}")
        self.sources = {SOURCES[name] for name in names}
        self.keys = parse_keys(env.get("SEAL_KEYS", ""))
        self.smtp_host = env.get("SMTP_HOST", "127.0.0.1")
        self.smtp_port = int(env.get("SMTP_PORT", "25"))
        self.folder = env.get("MAIL_FOLDER", "")
        self.sender = env.get("MAIL_FROM", "Partner <no-reply@partner.example>")
        self.message_id_host = env.get("MESSAGE_ID_HOST", "partner.example")
        self.state = State(env.get("STATE_DB", "consumer-state.sqlite3"))
        params = pika.URLParameters(
            env.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
        )
        params.heartbeat = 10
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        # Results are published with confirms: a job is acked only once its
        # result is with the broker.
        self.channel.confirm_delivery()
        self.channel.basic_qos(prefetch_count=16)
        # The exchange as Usher declares it (durable topic); this pipeline's
        # own durable quorum queue, bound on the jobs' routing key.
        self.channel.exchange_declare(EMAIL_EXCHANGE, exchange_type="topic", durable=True)
        self.channel.queue_declare(
            self.queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        self.channel.queue_bind(self.queue, EMAIL_EXCHANGE, routing_key=JOB_ROUTING_KEY)

    def run(self) -> None:
        self.channel.basic_consume(self.queue, self.on_message)
        print(f"ready: consuming {self.queue}", flush=True)
        self.channel.start_consuming()

    def stop(self, *_):
        self.channel.stop_consuming()

    def on_message(self, channel, method, properties, body):
        try:
            job = pb.EmailJob.FromString(body)
        except Exception:  # noqa: BLE001 - any undecodable body
            print("undecodable job dropped", file=sys.stderr, flush=True)
            channel.basic_ack(method.delivery_tag)
            return
        if job.source not in self.sources:
            # Another source: Usher's notification service sends it.
            channel.basic_ack(method.delivery_tag)
            return
        done = self.state.outcome(job.job_id)
        if done and done[0] in (pb.DELIVERY_STATUS_SENT, pb.DELIVERY_STATUS_FAILED):
            # A redelivered copy (at least once): not sent again. Its result
            # is published again, in case the first one was lost with a crash
            # before the ack (the producer dedupes results).
            status, attempts, reason, message_id = done
            self.publish_result(job, status, reason, attempts, message_id)
            channel.basic_ack(method.delivery_tag)
            print(f"duplicate job {job.job_id}: not sent again", flush=True)
            return
        attempts = self.state.attempt(job.job_id)
        message_id = f"<{job.job_id}@{self.message_id_host}>"
        try:
            self.send(job, message_id)
            status, reason = pb.DELIVERY_STATUS_SENT, ""
        except Permanent as error:
            status, reason, message_id = pb.DELIVERY_STATUS_FAILED, str(error), ""
        except (OSError, smtplib.SMTPException) as error:
            code = getattr(error, "smtp_code", 0)
            if 500 <= code < 600:
                status, reason, message_id = pb.DELIVERY_STATUS_FAILED, str(error), ""
            else:
                # Transient: report QUEUED, retry later (a real pipeline
                # would use its own delay queue rather than sleeping).
                self.publish_result(job, pb.DELIVERY_STATUS_QUEUED, str(error)[:500], attempts, "")
                time.sleep(1)
                channel.basic_nack(method.delivery_tag, requeue=True)
                return
        reason = reason[:500]
        self.state.finish(job.job_id, status, reason, message_id)
        self.publish_result(job, status, reason, attempts, message_id)
        channel.basic_ack(method.delivery_tag)
        print(f"{SOURCE_NAMES[job.source]} job {job.job_id}: {pb.DeliveryStatus.Name(status)}", flush=True)

    def send(self, job, message_id: str) -> None:
        link = ""
        if job.sealed_link:
            key = self.keys.get(job.seal_key_id)
            if key is None:
                raise Permanent(f"unknown seal key {job.seal_key_id!r}")
            link = open_link(key, job.job_id, job.sealed_link)
        variables = job.variables
        message = email.message.EmailMessage()
        message["From"] = self.sender
        message["To"] = email.utils.formataddr((job.recipient_name, job.recipient_email))
        message["Message-ID"] = message_id
        message["Subject"] = f"{pb.EmailTemplate.Name(job.template)} for {variables.account_name}"
        lines = [f"Hello {job.recipient_name or job.recipient_email},", ""]
        if variables.inviter_name:
            lines.append(f"{variables.inviter_name} invited you to join {variables.account_name}.")
        if link:
            lines.append(link)
        message.set_content("\n".join(lines) + "\n")
        if self.folder:
            os.makedirs(self.folder, exist_ok=True)
            with open(os.path.join(self.folder, f"{job.job_id}.eml"), "wb") as out:
                out.write(bytes(message))
            return
        with smtplib.SMTP(self.smtp_host, self.smtp_port, timeout=30) as smtp:
            smtp.send_message(message)

    def publish_result(self, job, status: int, reason: str, attempts: int, message_id: str):
        result = pb.DeliveryResult(
            job_id=job.job_id,
            account_id=job.account_id,
            template=job.template,
            invitation_id=job.invitation_id,
            user_id=job.user_id,
            token_version=job.token_version,
            status=status,
            reason=reason,
            attempts=attempts,
            message_id=message_id if status == pb.DELIVERY_STATUS_SENT else "",
        )
        result.status_time.GetCurrentTime()
        self.channel.basic_publish(
            EMAIL_EXCHANGE,
            f"email.result.{SOURCE_NAMES[job.source]}",
            result.SerializeToString(),
            pika.BasicProperties(
                content_type=PROTOBUF,
                type=RESULT_TYPE,
                delivery_mode=pika.DeliveryMode.Persistent,
                timestamp=int(time.time()),
            ),
        )


def main() -> None:
    check_vectors()
    if "--check-vectors" in sys.argv[1:]:
        return
    consumer = Consumer(os.environ)
    signal.signal(signal.SIGTERM, consumer.stop)
    consumer.run()


if __name__ == "__main__":
    main()
