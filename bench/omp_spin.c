/* How much CPU an idle OpenMP thread burns after a parallel region before it sleeps, under
 * this libgomp and GOMP_SPINCOUNT (docs/PLANNER.md, "Cores shared"):
 *
 *     gcc -O2 -fopenmp bench/omp_spin.c -o /tmp/omp_spin
 *     for n in 300000 30000 1000; do GOMP_SPINCOUNT=$n /tmp/omp_spin; done
 *
 * A 2-thread region of a little work, then the main thread asleep for 50 ms while the
 * process's CPU time is read: what the other thread spent spinning. 20 times, the mean. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double ms_between(struct timespec a, struct timespec b) {
    return (double)(b.tv_sec - a.tv_sec) * 1e3 + (double)(b.tv_nsec - a.tv_nsec) / 1e6;
}

int main(void) {
    const int rounds = 20;
    double idle_cpu = 0.0;
    for (int r = 0; r < rounds; r++) {
#pragma omp parallel num_threads(2)
        {
            volatile double x = 0;
            for (int i = 0; i < 200000; i++) x += i;
        }
        struct timespec a, b;
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &a);
        usleep(50000);
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &b);
        idle_cpu += ms_between(a, b);
    }
    const char *n = getenv("GOMP_SPINCOUNT");
    printf("GOMP_SPINCOUNT=%s: %.3f ms of CPU spent while idle, per idle period\n",
           n ? n : "(unset)", idle_cpu / rounds);
    return 0;
}
