"""Checks that RabbitMQ refuses a user what it must not do (VM tests; needs pika).

    amqp-refused.py URL USER PASSWORD_FILE ACTION...

ACTION is consume:QUEUE, publish:EXCHANGE, declare-queue:QUEUE, declare-exchange:EXCHANGE or
delete-queue:QUEUE. Each runs on a channel of its own and must be closed by the broker with
403 ACCESS_REFUSED. Exits 0 if every action was refused, 1 otherwise (printing which were not).
"""

import sys

import pika


def attempt(channel, action, name):
    if action == "consume":
        channel.basic_get(queue=name, auto_ack=False)
    elif action == "publish":
        channel.confirm_delivery()
        channel.basic_publish(exchange=name, routing_key="amqp-refused", body=b"{}")
    elif action == "declare-queue":
        channel.queue_declare(queue=name, durable=True)
    elif action == "declare-exchange":
        channel.exchange_declare(exchange=name, exchange_type="direct", durable=True)
    elif action == "delete-queue":
        channel.queue_delete(queue=name)
    else:
        raise SystemExit(f"amqp-refused: unknown action {action}")


def main():
    url, user, password_file, *actions = sys.argv[1:]
    with open(password_file) as f:
        password = f.read().removesuffix("\n")
    params = pika.URLParameters(url)
    params.credentials = pika.PlainCredentials(user, password)
    connection = pika.BlockingConnection(params)
    allowed = []
    for spec in actions:
        action, name = spec.split(":", 1)
        channel = connection.channel()
        try:
            attempt(channel, action, name)
        except pika.exceptions.ChannelClosedByBroker as e:
            if e.reply_code != 403:
                allowed.append(f"{spec} (closed with {e.reply_code} {e.reply_text}, not 403)")
            else:
                print(f"{user}: {spec} refused (403)")
            continue
        allowed.append(spec)
        channel.close()
    connection.close()
    if allowed:
        print(f"{user}: not refused: {', '.join(allowed)}")
        sys.exit(1)


main()
