#include "log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

static const char *const level_names[] = {"debug", "info", "warn", "error"};
static int min_level = -1;
static pthread_once_t level_once = PTHREAD_ONCE_INIT;

static void level_from_env(void)
{
    const char *v = getenv("STEK_LOG_LEVEL");
    int lvl = STEK_LOG_INFO;
    for (int i = 0; v != NULL && i < 4; i++)
        if (strcasecmp(v, level_names[i]) == 0)
            lvl = i;
    if (min_level < 0)
        min_level = lvl;
}

void stek_log_set_level(stek_log_level level)
{
    pthread_once(&level_once, level_from_env);
    min_level = (int)level;
}

int stek_log_enabled(stek_log_level level)
{
    pthread_once(&level_once, level_from_env);
    return (int)level >= min_level;
}

void stek_log(stek_log_level level, const char *component, const char *fmt, ...)
{
    if (!stek_log_enabled(level))
        return;
    char text[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    /* One event, one line: a newline in the text would forge a second event. */
    for (char *p = text; *p; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';

    struct timespec ts;
    struct tm tm;
    char when[32];
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%S", &tm);
    /* A single fprintf keeps concurrent lines whole (stdio locks the stream). */
    fprintf(stderr, "%s.%03ldZ %s %s: %s\n", when, ts.tv_nsec / 1000000L, level_names[level],
            component ? component : "stek", text);
}
