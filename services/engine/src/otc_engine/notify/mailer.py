"""Sends one e-mail over SMTP; failures come back as MailError saying whether a retry can help."""

from __future__ import annotations

import asyncio
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

import aiosmtplib

from otc_engine.notify import rules
from otc_engine.notify.settings import SmtpConfig


class MailError(Exception):
    """`reason` is safe to log and store: it names the server's reply, never the message body."""

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


class Mailer:
    def __init__(self, config: SmtpConfig) -> None:
        self.config = config

    def build(self, recipient: str, subject: str, body: str, message_id: str | None = None) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self.config.sender
        message["To"] = recipient
        message["Subject"] = subject
        message["Date"] = formatdate(usegmt=True)
        message["Auto-Submitted"] = "auto-generated"
        message["Message-ID"] = message_id or make_msgid(domain=self.config.sender.rsplit("@", 1)[-1])
        message.set_content(body)
        return message

    async def send(
        self,
        recipient: str,
        subject: str,
        body: str,
        *,
        message_id: str | None = None,
        limit_seconds: float | None = None,
    ) -> None:
        message = self.build(recipient, subject, body, message_id)
        config = self.config
        limit = limit_seconds or config.timeout_seconds
        try:
            # aiosmtplib's timeout bounds each step; this bounds the whole conversation.
            async with asyncio.timeout(limit):
                await aiosmtplib.send(
                    message,
                    sender=config.sender,
                    recipients=[recipient],
                    hostname=config.host,
                    port=config.port,
                    username=config.username or None,
                    password=config.password or None,
                    start_tls=config.starttls,
                    timeout=limit,
                )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [refused.code for refused in exc.recipients]
            permanent = all(rules.smtp_permanent(code) for code in codes)
            raise MailError(f"recipient refused ({', '.join(map(str, codes))})", permanent=permanent) from None
        except (aiosmtplib.SMTPDataError, aiosmtplib.SMTPRecipientRefused) as exc:
            raise MailError(
                f"mail server replied {exc.code}: {_short(exc.message)}", permanent=rules.smtp_permanent(exc.code)
            ) from None
        except aiosmtplib.SMTPResponseException as exc:
            # Greeting, login or sender refused: the broker's own setup, not this message; retrying
            # lets an operator fix it without losing e-mails.
            raise MailError(f"mail server replied {exc.code}: {_short(exc.message)}", permanent=False) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise MailError(f"could not talk to the mail server ({type(exc).__name__})", permanent=False) from None


def _short(text: str) -> str:
    return " ".join(text.split())[:200]
