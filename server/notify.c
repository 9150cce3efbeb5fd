/*
 * sd_notify wrappers. stekd keeps NOTIFY_SOCKET in its environment
 * (unset_environment 0): the scheduler thread pings the watchdog for the
 * whole life of the process.
 */
#include "notify.h"

#include <stddef.h>
#include <stdint.h>

#ifdef STEK_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

void stekd_notify_ready(const char *status)
{
#ifdef STEK_HAVE_SYSTEMD
    (void)sd_notifyf(0, "READY=1\nSTATUS=%s", status != NULL ? status : "serving");
#else
    (void)status;
#endif
}

void stekd_notify_stopping(void)
{
#ifdef STEK_HAVE_SYSTEMD
    (void)sd_notify(0, "STOPPING=1\nSTATUS=stopping");
#endif
}

bool stekd_notify_watchdog_enabled(unsigned long *interval_ms)
{
#ifdef STEK_HAVE_SYSTEMD
    uint64_t usec = 0;
    if (sd_watchdog_enabled(0, &usec) > 0) {
        *interval_ms = (unsigned long)(usec / 1000);
        return true;
    }
#endif
    *interval_ms = 0;
    return false;
}

void stekd_notify_watchdog(void)
{
#ifdef STEK_HAVE_SYSTEMD
    (void)sd_notify(0, "WATCHDOG=1");
#endif
}
