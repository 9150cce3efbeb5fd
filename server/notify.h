/*
 * systemd service notification (Type=notify), through libsystemd's
 * sd_notify when stekd is built with it (STEK_HAVE_SYSTEMD); otherwise, and
 * whenever NOTIFY_SOCKET is unset, every function does nothing.
 */
#ifndef STEK_SERVER_NOTIFY_H
#define STEK_SERVER_NOTIFY_H

#include <stdbool.h>

/* READY=1 with a one-line status: stekd is listening and has its keys. */
void stekd_notify_ready(const char *status);

/* STOPPING=1: shutdown has begun. */
void stekd_notify_stopping(void);

/*
 * True when the service manager expects watchdog pings (WatchdogSec=);
 * *interval_ms gets the interval. The scheduler pings at least every second.
 */
bool stekd_notify_watchdog_enabled(unsigned long *interval_ms);

/* WATCHDOG=1: the scheduler is alive. */
void stekd_notify_watchdog(void);

#endif
