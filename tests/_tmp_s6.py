import sys, time, os; sys.path.insert(0,'.')
t0=time.time()
import torch, tempfile
import test_hessian as T
def worker(rank, ws, port, sp, od):
    t=time.time()
    T.hessian_worker(rank, ws, port, sp, od)
    print('worker', rank, time.time()-t, flush=True)
if __name__=='__main__':
    import test_hessian as T2
    d=tempfile.mkdtemp(); m=T.micro_model(); torch.save(m.state_dict(), d+'/s.pt')
    t=time.time(); T.run_ranks(worker, 2, d+'/s.pt', d); print('run_ranks', time.time()-t)
