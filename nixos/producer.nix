# services.sistema-mensajes.producer: publishes simulated weather readings to RabbitMQ.
import ./daemon.nix {
  daemon = "producer";
  description = "the sistema-mensajes producer (simulated weather readings into RabbitMQ)";
  metricsPort = 9101;
  credentials.amqp-password = "the broker password";
}
