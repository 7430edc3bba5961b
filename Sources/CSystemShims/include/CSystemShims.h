// GNU extensions the Glibc Swift overlay doesn't expose (SEEK_DATA/SEEK_HOLE,
// fallocate modes, accept4, thread names, CPU affinity). Implemented in shims.c, which is compiled with
// _GNU_SOURCE so this header stays compatible with the Glibc module.
#include <sys/types.h>
#include <sys/socket.h>
#include <pthread.h>
#include <spawn.h>

off_t cshim_seek_data(int fd, off_t offset);
off_t cshim_seek_hole(int fd, off_t offset);
int cshim_punch_hole(int fd, off_t offset, off_t length);
int cshim_zero_range(int fd, off_t offset, off_t length);
int cshim_accept_cloexec(int fd, struct sockaddr *addr, socklen_t *len);
int cshim_stream_socket(int family);
int cshim_set_thread_name(pthread_t thread, const char *name);
int cshim_available_processors(void);
int cshim_stat_mode(const char *path);
/// posix_spawn_file_actions_addclosefrom_np: the child keeps no descriptor from `from` up.
int cshim_spawn_close_from(posix_spawn_file_actions_t *actions, int from);
/// preadv2 with RWF_NOWAIT: reads only what the page cache holds, else -1 with EAGAIN.
ssize_t cshim_pread_nowait(int fd, void *buffer, size_t count, off_t offset);
