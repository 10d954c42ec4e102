/* usbctl: concurrent control transfers from a busybox guest (built static into the e2e initramfs).
 *
 *   usbctl slowread DEV NPROC LEN STOPFILE
 *
 * Forks NPROC processes; process k sends vendor IN 0x5d (the emulated loopback device's
 * SLOW_READ) with wValue = its transfer number, wIndex = k, wLength = LEN through usbfs
 * (USBDEVFS_CONTROL on DEV, /dev/bus/usb/BBB/DDD) until STOPFILE exists, and checks every answer
 * byte-exact: byte j = (wValue + 7 * wIndex + j) & 0xff. Each process prints one line
 * "k ok=N bad=N err=N last_errno=E"; then "total ok=N bad=N err=N". Exit 0 only if every
 * transfer came back complete and exact. */
#include <errno.h>
#include <fcntl.h>
#include <linux/usbdevice_fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <unistd.h>

static int child(const char *dev, int k, int len, const char *stop) {
  int fd = open(dev, O_RDWR);
  if (fd < 0) { printf("%d open %s: %s\n", k, dev, strerror(errno)); return 2; }
  unsigned char buf[4096];
  long ok = 0, bad = 0, err = 0; int last = 0;
  for (unsigned i = 0; access(stop, F_OK) != 0; i++) {
    struct usbdevfs_ctrltransfer c = { .bRequestType = 0xc0, .bRequest = 0x5d, .wValue = (unsigned short)i, .wIndex = (unsigned short)k, .wLength = (unsigned short)len, .timeout = 30000, .data = buf };
    memset(buf, 0xee, sizeof buf);
    int n = ioctl(fd, USBDEVFS_CONTROL, &c);
    if (n < 0) { err++; last = errno; if (err > 20) break; continue; }
    int good = n == len;
    for (int j = 0; good && j < len; j++) good = buf[j] == (unsigned char)((unsigned short)i + 7 * k + j);
    if (good) ok++; else bad++;
  }
  printf("%d ok=%ld bad=%ld err=%ld last_errno=%d\n", k, ok, bad, err, last);
  fflush(stdout);
  return bad || err ? 1 : 0;
}

int main(int argc, char **argv) {
  if (argc != 6 || strcmp(argv[1], "slowread") != 0) { fprintf(stderr, "usage: usbctl slowread DEV NPROC LEN STOPFILE\n"); return 2; }
  int nproc = atoi(argv[3]), len = atoi(argv[4]);
  if (nproc < 1 || nproc > 64 || len < 1 || len > 4096) { fprintf(stderr, "usbctl: NPROC 1..64, LEN 1..4096\n"); return 2; }
  setvbuf(stdout, NULL, _IOLBF, 0);
  for (int k = 0; k < nproc; k++) {
    pid_t p = fork();
    if (p == 0) _exit(child(argv[2], k, len, argv[5]));
    if (p < 0) { perror("fork"); return 2; }
  }
  int failed = 0, st;
  while (wait(&st) > 0) if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) failed++;
  printf("total failed_processes=%d\n", failed);
  return failed ? 1 : 0;
}
